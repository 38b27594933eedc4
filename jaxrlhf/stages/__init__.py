"""One module per pipeline stage: build state, loop over data, log, checkpoint, export."""
