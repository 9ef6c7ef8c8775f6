"""`edgemoe serve`: an OpenAI-compatible HTTP server over the generation step API.

worker.py   one thread owns the model: continuous batching, admission, prefix reuse
protocol.py OpenAI's request and response shapes, errors naming the field
app.py      the Starlette app on uvicorn (endpoints, streaming, the API key)
metrics.py  GET /metrics in Prometheus text
static/     the chat page and its live panel (no build step, nothing from a CDN)
loadgen.py  a loopback load generator and a capped server, for the load test and benchmarks
cli.py      the `serve` subcommand

Needs the `server` extra: pip install 'edgemoe[server]'.
"""
