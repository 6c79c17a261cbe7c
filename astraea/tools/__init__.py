"""Tools around the services: the command line, the simulator, the benchmarks, trace replay
and the local stack launcher. The only part of the project that may import every other part;
nothing imports it."""
