"""Registries: the distribution protocol, and nothing above it.

The layers, from the bottom up (calls go down, never back up; references
are read by :mod:`lamina.oci.reference`, below this package):

``hosts``       which endpoints serve a registry (``hosts.toml``: mirrors,
                capabilities, TLS material, plain HTTP)
``transport``   HTTP/1.1 over ``http.client`` with TLS contexts per host,
                a deadline on every phase of a request, redirects that
                never carry credentials to another host or scheme
``auth``        credentials (``--user``, ``~/.docker/config.json``, helpers) and
                the Bearer-token / Basic challenge flow, per repository scope
``session``     one registry conversation: endpoints in order, retries with
                backoff, re-authentication on 401
``resolver``    a reference to a descriptor (HEAD, then GET), and the small
                documents (manifests, indexes, configs) behind descriptors
``fetcher``     a blob as a stream, verified as it is read, from any offset
                (containerd's ``remotes.Fetcher``)
``referrers``   OCI 1.1 referrers: the API, or the tag schema's index

Like containerd's ``core/remotes``, this package knows nothing of the content
store's ingests, the image store or snapshots: pull, push and tag are image
operations (:mod:`lamina.images.pull`, :mod:`lamina.images.push`,
:class:`lamina.images.service.ImageService`), which decide where the streams
go. ``scripts/layering.py`` keeps it so.
"""
