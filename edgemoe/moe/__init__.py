"""The MoE layer: router -> dispatch -> experts -> combine, and the executor seam.

Model files call a router (router.py) and hand the tokens with their
(expert, weight) choices to an ExpertExecutor (executor.py). Executors use
dispatch.py, experts.py and combine.py; reference.py is the plain-torch
oracle the tests compare them against.
"""
