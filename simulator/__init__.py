"""The serving simulator: scenarios (config), the run pipeline (pipeline.run_scenario), the SimPy
loop (simulation.simulate), schedulers (replica: paged; slots: llama.cpp), router, step costs
(roofline prior, calibrated lookups, a llama.cpp engine profile), metrics and outputs.
Imports neither torch nor the profiler."""
