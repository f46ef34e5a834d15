"""Forecasts checked against measurements: step throughput (validate) and a real server under load (validate-serving)."""
