"""The wire: pure codecs of what travels in a SysV message (the envelope, PHP's
``serialize()`` format, JSON).  Functions of bytes only: no kernel, no logging."""
