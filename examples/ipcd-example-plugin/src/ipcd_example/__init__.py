"""Example handlers for ipcd: ``wordcount`` (text statistics) and ``compress`` (gzip a
file). They show the handler API: a function of a ``Job`` that returns the output, fails
the job with ``HandlerError`` and asks for another run with ``Retry``."""
