"""`astraea-gateway`: the OpenAI Chat Completions API in front of the control plane.

A separate service, a client of `AgentService` over gRPC like any other (several gateways may
run side by side); it imports only `astraea`. Each chat session is one Astraea job and each
request one segment of it; see docs/design.md ("The OpenAI gateway").

    config.py      the gateway's settings
    errors.py      OpenAI-shaped errors, and gRPC statuses mapped to HTTP ones
    schemas.py     the request body, validated (pydantic)
    chat.py        the chat template, tokenizing, decoding, tool-call parsing
    sessions.py    sessions: found by id or by prompt prefix, one job each, idle reaping
    completions.py one request as one segment, answered whole or streamed
    app.py         the FastAPI app
    server.py      the command line
"""
