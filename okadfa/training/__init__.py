"""The training application on top of the library: data (okadfa.training.data), the train
loop and `okadfa train` (train), `okadfa compare` (compare), `make demo` (demo),
checkpoints (checkpoint) and --precision with its autocast (precision). It imports the
library (okadfa.models, okadfa.dfa, okadfa.diagnostics); the library never imports it."""
