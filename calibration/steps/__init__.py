"""Step costs: per-operator regressors fitted on a profile (fit, features), where profiles are
found (profiles), and the fits compiled into lookups the simulator reads (compile)."""
