"""The Lightning layer: the LightningModules that train a model or distil a student, the callbacks around
them (RNG stream, loss log, NaN/Inf guard, throughput), the checkpoint IO and the choice of the checkpoint
to resume from. Everything else in the package works with torch alone; the modules here are imported by
their full names (this package imports nothing itself)."""
