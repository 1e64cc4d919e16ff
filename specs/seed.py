"""The seed example (SPEC section 7), end to end on an embedded local Ray.

specs/counter.yaml declares an async Counter actor with an HTTP server on
localhost:8080. We apply it, increment five times through the Ray handle, and
read the count back over plain HTTP, from outside Ray.
"""
from pathlib import Path
from urllib.request import urlopen

import ray

import oobspec

spec = oobspec.load(Path(__file__).resolve().parent / "counter.yaml")
with oobspec.deploy(spec, progress=print) as d:
    counter = d.handle("counter", 0)
    for _ in range(5):
        ray.get(counter.increment.remote())
    url = d.endpoints["counter"]["http"][0]
    with urlopen("http://localhost:8080/") as reply:
        body = reply.read().decode()
    print(f"GET {url}/ -> {body}")
    assert body == "5", body
