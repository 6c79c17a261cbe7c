"""Generated code of the `astraea.v1` gRPC contracts (proto/astraea/v1/*.proto).

Do not edit: regenerate with scripts/gen_proto.sh. tests/test_proto.py checks it is fresh.
"""
