"""``loadtest``: does prompt caching hold under load?

``plan`` builds the run's prompts and its cost estimate, ``driver`` sends them at a bounded
concurrency, ``result`` judges and summarises what came back (``stats``: percentiles), and
``cli`` is the command. Only the command runs a load test; the daemon never imports it.
docs/loadtest.md describes the options, the statistics and how cold and warm are decided.
"""
