"""Requests to endpoints that speak plain HTTP (a stack's PostgREST, the pooled API's admin port,
a dev fleet's controller).

A request httpx makes without a client of its own builds a new SSL context and loads the whole
CA bundle into it: about 65 ms of CPU, every time, for a TLS these requests never speak (a
probe retried every half second spent a third of the docker agent's time there). NO_TLS is built
once and trusts no certificate at all, so a URL that turns out to be HTTPS fails rather than
being trusted.
"""

import ssl

NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
