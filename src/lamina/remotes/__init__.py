"""Registries: references, host configuration, transport and auth, pull and push.

The layers, from the bottom up (calls go down, never back up):

``reference``   parsing and docker-style normalisation of image references
``hosts``       which endpoints serve a registry (``hosts.toml``: mirrors,
                capabilities, TLS material, plain HTTP)
``transport``   HTTP/1.1 over ``http.client`` with TLS contexts per host,
                a deadline on every phase of a request, redirects that
                never carry credentials to another host or scheme
``auth``        credentials (``--user``, ``~/.docker/config.json``, helpers) and
                the Bearer-token / Basic challenge flow, per repository scope
``session``     one registry conversation: endpoints in order, retries with
                backoff, re-authentication on 401
``resolver``    a reference to a descriptor (HEAD, then GET)
``fetcher``     blobs streamed into the content store: resumable, verified
``pusher``      blobs and manifests out: existence checks, mounts, uploads
``pull`` /      the orchestration: what to fetch, in what order, unpacking
``push``        while downloading, image registration
"""
