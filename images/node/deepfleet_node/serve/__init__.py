"""One long-running model replica for `deepfleet serve` (`python -m deepfleet_node.serve`),
answering the gateway over HTTP; see cli.py for the protocol.

  cli      arguments and main
  request  a /generate body checked and tokenized (RequestError: a 400)
  stream   text deltas as tokens arrive, stop strings, cancellation, NDJSON lines
  replica  the model replica: load, warm up, generate one request at a time
  loading  the model on its GPUs or the CPU, and its dtype
  app      the bearer-token middleware, the FastAPI routes, uvicorn

Import-light: nothing here imports torch, transformers or FastAPI at import time (the
operator's machine may import it for its constants).
"""
