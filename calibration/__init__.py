"""What the simulator is calibrated with, by job: steps/ (step-cost fits on profiles, compiled
into lookups), lengths/ (ShareGPT lengths, the response-length predictor, length inflation under
compression), generation/ (real generations with SmolLM2 that the inflation model is fitted on),
quality/ (negative samples in per-sample scores). Reads tables; never imports the simulator."""
