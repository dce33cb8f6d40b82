"""The retrieval service scaled out on Ray Serve: shard replicas, a fan-out, one gRPC front.

Where one server is not enough, ``retromem serve --engine ray --deployment FILE`` runs the shards
and the fan-out as Ray Serve deployments of one application, behind the same ``retromem.v1``
gRPC API as ``retromem serve``:

- one deployment per shard (``shard-<name>``): each replica opens the shard's datastore and its
  dense and/or n-gram index exactly as ``retromem serve`` does (:meth:`Backend.open`) and answers
  the calls in process with the same :class:`RetrievalServicer`; its ``check_health`` reads a chunk
  and counts a token, so Serve replaces a replica that stops answering; replicas per shard, or
  ``autoscaling`` (min/max replicas, target ongoing requests), come from the deployment file;
- a fan-out deployment (``fanout``): the router of :mod:`retromem.service.router` itself, its
  shards reached through their deployment handles instead of gRPC channels, so every merge rule
  (top-k by score, counts summed, ∞-gram at the longest suffix, chunks from their owner) and the
  placement (global ids from each shard's declared datastore id and id range, never from shard
  order; a datastore given twice or overlapping ranges refused) is the router's, in one place;
- the gRPC front: :func:`retromem.service.server.start_server`'s own server (bounded queue,
  interceptors, bearer token, TLS, health, reflection, metrics) with a thin servicer that sends
  each call to the fan-out's handle and turns its answer back into the message or status code.
  With ``fanout: {in_front: true}`` the front runs the same router itself over the shards' handles
  instead: one Ray hop per call where the fan-out deployment costs two.

Why a thin front and not Serve's gRPC proxy (``grpc_servicer_functions``): the proxy serves unary
and server-streaming calls only (``SearchStream`` is bidirectional), answers its own health
service instead of ``grpc.health.v1`` with no reflection, runs none of the server's interceptors
(token, stream guard, metrics, queue bound) and maps a replica's error to INTERNAL unless each
method sets codes by hand. The front keeps the API byte for byte the same: same service, messages,
status codes and messages, health and reflection.

``Reload`` reaches every replica, though a handle call reaches one: the front redeploys the same
application with a new ``generation`` in the shard deployments' ``user_config`` (a lightweight
update: Serve calls each replica's ``reconfigure`` in place, which re-opens the shard's newest
version as ``retromem serve``'s Reload does, the old version serving until the new one is open),
then the same for the fan-out, whose replicas each run the router's Reload (re-read every shard's
size, re-place them within the declared ranges). The answer is the fan-out's; a replica whose
re-open failed keeps serving its previous version, and the router's Reload reports it.

A replica that dies is routed around: a call that reached it (the actor died under it) is sent
again, once or twice, through the handle, which has by then dropped the dead replica; what is still
unanswered returns UNAVAILABLE, which :class:`retromem.service.client.RetrievalClient` retries.
Every path in the deployment file must be readable by every node that may run a replica (shared
storage); the paths are opened where the replica runs. A URL (``s3://...``, any fsspec filesystem)
instead of a path is mirrored by each replica into its node's ``$RETROMEM_CACHE`` (one copy per node,
shared by its replicas under a lock; ``memory://`` is per process and reaches no replica).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import grpc

from retromem import storage
from retromem.config import fail, integer, is_int, number
from retromem.errors import ConfigError, QueryError, ServiceError
from retromem.service.common import stream_search
from retromem.service.config import SERVE_TARGET, ServerConfig
from retromem.service.v1 import retrieval_pb2 as pb
from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

APP = "retromem"
FANOUT = "fanout"
_SHARD_KEYS = {"name", "datastore", "dense", "ngram", "datastore_id", "first_doc", "first_chunk", "replicas",
               "autoscaling", "num_cpus", "max_ongoing_requests"}
_FANOUT_KEYS = {"replicas", "autoscaling", "num_cpus", "max_ongoing_requests", "in_front"}
RELOAD_TIMEOUT_S = 600.0  # a fan-out replica's Reload: every shard re-opens, then the router re-reads them
_AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "target_ongoing_requests", "initial_replicas",
                     # how fast Serve reacts (its defaults: up after 30 s, down after 600 s, over a 30 s window)
                     "upscale_delay_s", "downscale_delay_s", "look_back_period_s"}
_METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Retrieval"].methods}


# ---------------------------------------------------------------------------------------------
# the deployment description


@dataclass(frozen=True)
class Scaling:
    """How many replicas a deployment runs: ``replicas`` fixed, or ``autoscaling`` (Serve's
    ``autoscaling_config``: min_replicas, max_replicas, target_ongoing_requests); ``num_cpus`` each
    replica reserves; ``max_ongoing_requests`` it takes at once."""

    replicas: int = 1
    autoscaling: Mapping[str, Any] | None = None
    num_cpus: float = 1.0
    max_ongoing_requests: int = 32

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.num_cpus},
                                "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.replicas
        return opts


@dataclass(frozen=True)
class ShardSpec:
    """One shard: what its replicas open, and the ids it holds in the whole deployment."""

    name: str
    datastore: str | None
    dense: str | None
    ngram: str | None
    datastore_id: str
    first_doc: int
    first_chunk: int
    scaling: Scaling

    @property
    def target(self) -> str:
        return SERVE_TARGET + self.name

    @property
    def deployment(self) -> str:
        return f"shard-{self.name}"


@dataclass(frozen=True)
class RayDeployment:
    """A deployment description for ``--engine ray`` (see :func:`read_ray_deployment`)."""

    shards: tuple[ShardSpec, ...]
    fanout: Scaling = Scaling(num_cpus=0.0, max_ongoing_requests=64)
    app: str = APP
    # the front runs the router itself over the shards' handles: one Ray hop per call instead of two
    # (the fan-out deployment still checks the placement at deploy time, then idles)
    fanout_in_front: bool = False

    def server_config(self, **kw: Any) -> ServerConfig:
        """The front's (and fan-out's) ServerConfig: the shards as ``serve:NAME`` targets with their
        declared ranges; ``kw`` are the other ServerConfig fields (host, port, limits, ...)."""
        return ServerConfig(shards=tuple(s.target for s in self.shards),
                            shard_ranges=tuple((s.datastore_id, s.first_doc, s.first_chunk) for s in self.shards), **kw)


def _scaling(entry: Mapping[str, Any], where: str, default: Scaling) -> Scaling:
    replicas = entry.get("replicas", None)
    auto = entry.get("autoscaling", None)
    if replicas is not None and auto is not None:
        raise ConfigError(f"`{where}.replicas` and `{where}.autoscaling` exclude each other: give a fixed number of "
                          "replicas or an autoscaling range")
    if replicas is not None:
        integer(replicas, f"{where}.replicas", ge=1)
    if auto is not None:
        if not isinstance(auto, Mapping):
            fail(f"{where}.autoscaling", "be a mapping of min_replicas, max_replicas, target_ongoing_requests", auto)
        unknown = sorted(set(auto) - _AUTOSCALING_KEYS)
        if unknown:
            fail(f"{where}.autoscaling", f"hold only {sorted(_AUTOSCALING_KEYS)}", unknown)
        lo = integer(auto.get("min_replicas", 1), f"{where}.autoscaling.min_replicas", ge=0)
        hi = integer(auto.get("max_replicas", max(lo, 1)), f"{where}.autoscaling.max_replicas", ge=max(lo, 1))
        number(auto.get("target_ongoing_requests", 2), f"{where}.autoscaling.target_ongoing_requests", gt=0)
        if "initial_replicas" in auto:
            integer(auto["initial_replicas"], f"{where}.autoscaling.initial_replicas", ge=lo, le=hi)
        for key in ("upscale_delay_s", "downscale_delay_s"):
            if key in auto:
                number(auto[key], f"{where}.autoscaling.{key}", ge=0)
        if "look_back_period_s" in auto:
            number(auto["look_back_period_s"], f"{where}.autoscaling.look_back_period_s", gt=0)
        auto = dict(auto)
    num_cpus = number(entry.get("num_cpus", default.num_cpus), f"{where}.num_cpus", ge=0)
    ongoing = integer(entry.get("max_ongoing_requests", default.max_ongoing_requests), f"{where}.max_ongoing_requests", ge=1)
    return Scaling(replicas if replicas is not None else default.replicas, auto, float(num_cpus), ongoing)


def parse_ray_deployment(data: Any, base: Path | None = None) -> RayDeployment:
    """A :class:`RayDeployment` from the parsed file (``base``: the directory relative paths start
    from). Every mistake names its field: ``shards[1].first_chunk``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("shards"), list):
        fail("shards", "be a list of {name, datastore, dense, ngram, datastore_id, first_doc, first_chunk, replicas | "
                       "autoscaling}", type(data.get("shards") if isinstance(data, Mapping) else data).__name__)
    unknown = sorted(set(data) - {"shards", "fanout", "app"})
    if unknown:
        fail("deployment", "hold only `app`, `fanout` and `shards`", unknown)
    entries = data["shards"]
    if not entries:
        fail("shards", "list at least one shard", [])
    shards: list[ShardSpec] = []
    for i, e in enumerate(entries):
        w = f"shards[{i}]"
        if not isinstance(e, Mapping):
            fail(w, "be a mapping", e)
        unknown = sorted(set(e) - _SHARD_KEYS)
        if unknown:
            hint = " (`target` belongs to a gRPC router's deployment; with --engine ray give the shard's paths)" \
                if "target" in unknown else ""
            fail(w, f"hold only {sorted(_SHARD_KEYS)}{hint}", unknown)
        name = e.get("name", str(i))
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
            fail(f"{w}.name", "be a name of letters, digits, '-' and '_'", name)
        paths = {}
        for key in ("datastore", "dense", "ngram"):
            p = e.get(key)
            if p is None:
                paths[key] = None
                continue
            if not isinstance(p, str) or not p:
                fail(f"{w}.{key}", "be a directory path", p)
            if storage.is_url(p):  # each replica mirrors it into its node's cache (retromem.storage.local_dir)
                fs, rpath = storage.url_fs(p, f"{w}.{key}")
                if not fs.exists(rpath):
                    fail(f"{w}.{key}", "be a URL that holds the artifact", p)
                paths[key] = p
                continue
            path = Path(p) if base is None or Path(p).is_absolute() else base / p
            if not path.is_dir():  # replicas memory-map their files: a local path on storage every node mounts
                fail(f"{w}.{key}", "be a directory every node can read (shared storage), or a URL", str(path))
            paths[key] = str(path)
        if not any(paths.values()):
            fail(w, "name at least one of `datastore`, `dense`, `ngram`", dict(e))
        ident = e.get("datastore_id")
        if not isinstance(ident, str) or not ident:
            fail(f"{w}.datastore_id", "be the datastore id the shard serves (`retromem query info` or the datastore's "
                                      "manifest): global ids come from the description", ident)
        first = []
        for key in ("first_doc", "first_chunk"):
            if not is_int(e.get(key)) or e[key] < 0:
                fail(f"{w}.{key}", "be a non-negative integer", e.get(key))
            first.append(int(e[key]))
        shards.append(ShardSpec(name, paths["datastore"], paths["dense"], paths["ngram"], ident, first[0], first[1],
                                _scaling(e, w, Scaling())))
    for what, key in (("name", lambda s: s.name), ("datastore_id", lambda s: s.datastore_id)):
        seen: dict[Any, int] = {}
        for i, s in enumerate(shards):
            if key(s) in seen:
                raise ConfigError(f"`shards[{i}].{what}` repeats `shards[{seen[key(s)]}].{what}` ({key(s)!r}): give each "
                                  "shard once (a datastore served twice would return every hit twice)")
            seen[key(s)] = i
    for key in ("datastore", "dense", "ngram"):
        seen = {}
        for i, s in enumerate(shards):
            p = getattr(s, key)
            if p is not None and p in seen:
                raise ConfigError(f"`shards[{i}].{key}` repeats `shards[{seen[p]}].{key}` ({p}): give each shard once")
            if p is not None:
                seen[p] = i
    fan = data.get("fanout", {}) or {}
    if not isinstance(fan, Mapping) or set(fan) - _FANOUT_KEYS:
        fail("fanout", f"be a mapping of {sorted(_FANOUT_KEYS)}", fan)
    app = data.get("app", APP)
    if not isinstance(app, str) or not app:
        fail("app", "be a Serve application name", app)
    in_front = fan.get("in_front", False)
    if not isinstance(in_front, bool):
        fail("fanout.in_front", "be true or false", in_front)
    return RayDeployment(tuple(shards), _scaling(fan, "fanout", RayDeployment.fanout), app, in_front)


def read_ray_deployment(path: str | Path) -> RayDeployment:
    """Read a deployment file (YAML or JSON) for ``--engine ray``::

        app: retromem                      # Serve application name (default retromem)
        fanout: {replicas: 1}              # or autoscaling: {...}; num_cpus (default 0); in_front: true
                                           # merges in the front's process (one Ray hop fewer)
        shards:
          - name: a                        # deployment shard-a (default: the shard's index)
            datastore: /shared/a/datastore # paths every node sees; relative ones start at the file
            dense: /shared/a/dense
            ngram: /shared/a/ngram
            datastore_id: 3f2c...          # what the shard must serve, and its global id range
            first_doc: 0
            first_chunk: 0
            replicas: 2                    # or autoscaling: {min_replicas: 1, max_replicas: 4,
                                           #                  target_ongoing_requests: 2}
            num_cpus: 1                    # each replica's reservation (default 1)
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--deployment {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        return parse_ray_deployment(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"--deployment {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# calls through deployment handles, as gRPC stubs


class RemoteStatus(grpc.RpcError):
    """A status code and details, as a gRPC call error carries them (``code()``, ``details()``):
    what a replica's answer or a handle failure looks like to the router, and what
    :class:`LocalContext.abort` raises. Internal to the transport: it never reaches a caller, who
    gets the status on the wire. (Not in :mod:`retromem.errors`: it must be a ``grpc.RpcError``,
    and the ground floor does not import grpc.)"""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LocalContext:
    """The part of ``grpc.ServicerContext`` the servicers use, for a call answered inside a replica."""

    def __init__(self, timeout: float | None) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def is_active(self) -> bool:
        return self._deadline is None or time.monotonic() < self._deadline

    def abort(self, code: grpc.StatusCode, details: str):
        raise RemoteStatus(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def cancel(self) -> None:
        self._deadline = time.monotonic()


def answer_in_process(servicer: Any, method: str, request: Any, timeout: float | None) -> tuple:
    """``servicer.<method>(request)`` with a :class:`LocalContext`: ``("ok", response)`` or
    ``("error", status name, details)``; plain values, so that no exception crosses Ray."""
    ctx = LocalContext(timeout)
    try:
        if method == "stream_answer":  # SearchStream, one request: (r, SearchRequest) -> (results, missing)
            r, req = request
            results, missing = servicer.stream_answer(r, req, ctx)
            return "ok", (list(results), list(missing))
        return "ok", getattr(servicer, method)(request, ctx)
    except RemoteStatus as exc:
        return "error", exc.code().name, exc.details()
    except ServiceError as exc:
        return "error", exc.code.name, exc.message
    except QueryError as exc:
        return "error", "INVALID_ARGUMENT", str(exc)
    except NotImplementedError:  # the generated base class: UNIMPLEMENTED, as gRPC answers it
        return "error", (ctx.code() or grpc.StatusCode.UNIMPLEMENTED).name, ctx.details() or "Method not implemented!"
    except Exception as exc:  # a bug: say so, the replica keeps serving
        logger.exception("%s failed", method)
        return "error", "INTERNAL", f"{method} failed: {type(exc).__name__}: {exc}"


def _replica_gone(exc: BaseException) -> bool:
    """Whether a handle call failed because its replica died or became unreachable (worth sending again)."""
    from ray import exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError))


class _HandleCall:
    """One call in flight through a handle, started at once (so that a fan-out's calls overlap);
    ``result()`` gives the response or raises :class:`RemoteStatus`."""

    ATTEMPTS = 3  # a replica that died under the call: the handle routes the next attempt around it

    def __init__(self, handle: Any, what: str, method: str, request: Any, timeout: float | None) -> None:
        self.handle, self.what, self.method, self.request = handle, what, method, request
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._response = self._send()

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def _send(self):
        return self.handle.call.remote(self.method, self.request, self._remaining())

    def result(self, timeout: float | None = None) -> Any:
        for attempt in range(self.ATTEMPTS):
            remaining = self._remaining()
            try:
                # a little past the deadline: the replica answers DEADLINE_EXCEEDED itself when it can
                answer = self._response.result(timeout_s=None if remaining is None else remaining + 1.0)
            except TimeoutError:
                self._response.cancel()
                raise RemoteStatus(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.what} did not answer in time") from None
            except Exception as exc:
                if _replica_gone(exc) and attempt + 1 < self.ATTEMPTS and (remaining is None or remaining > 0):
                    logger.warning("%s: a replica of %s died under the call; sending it again", self.method, self.what)
                    self._response = self._send()
                    continue
                code = grpc.StatusCode.UNAVAILABLE if _replica_gone(exc) else grpc.StatusCode.INTERNAL
                raise RemoteStatus(code, f"{self.what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
            if answer[0] == "ok":
                return answer[1]
            raise RemoteStatus(grpc.StatusCode[answer[1]], answer[2])
        raise AssertionError("unreachable")


class _HandleMethod:
    def __init__(self, handle: Any, what: str, method: str) -> None:
        self.handle, self.what, self.method = handle, what, method

    def future(self, request: Any, timeout: float | None = None, metadata: Any = None, wait_for_ready: Any = None):
        return _HandleCall(self.handle, self.what, self.method, request, timeout)

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None, wait_for_ready: Any = None):
        return self.future(request, timeout).result()


class HandleStub:
    """A ``RetrievalStub`` look-alike over a Serve deployment handle whose replicas answer
    ``call(method, request, timeout)`` (``stub.Count(req, timeout=...)`` and ``.future``): what the
    router calls its shards through. ``metadata`` is ignored: the shards are inside the cluster."""

    def __init__(self, handle: Any, what: str) -> None:
        self.handle, self.what = handle, what

    def __getattr__(self, method: str) -> _HandleMethod:
        if method not in _METHODS and method != "stream_answer":
            raise AttributeError(method)
        return _HandleMethod(self.handle, self.what, method)


class _NoChannel:
    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# the replicas (plain classes: made Serve deployments in build_app, so that importing this module needs no ray)


def _first_live_chunk(ds: Any) -> int | None:
    """The first chunk of the first document not taken down (None: no live document)."""
    doc = 0
    for d in ds.deleted_doc_ids.tolist():  # sorted
        if d > doc:
            break
        doc = d + 1
    return int(ds.doc_first_chunk_array[doc]) if doc < ds.num_documents else None


class ShardReplica:
    """One replica of a shard: ``retromem serve``'s servicer over the shard's files, in process."""

    def __init__(self, cfg: ServerConfig) -> None:
        from retromem.service.servicer import Backend, RetrievalServicer

        if cfg.torch_threads is not None:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        if cfg.faiss_threads is not None:
            import faiss

            faiss.omp_set_num_threads(cfg.faiss_threads)
        self.servicer = RetrievalServicer(cfg, Backend.open(cfg))
        b = self.servicer.b
        if b.dense is not None and b.dense.meta.get("embedder"):
            b.dense.embedder  # load the model now: the first text query should not pay for it

    def call(self, method: str, request: Any, timeout: float | None) -> tuple:
        return answer_in_process(self.servicer, method, request, timeout)

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Serve calls this after ``__init__`` and again on every replica when the application's
        ``user_config`` changes: a new ``generation`` is a Reload (this shard's newest version opened
        anew; on failure the old one keeps serving, and the router's Reload reports it)."""
        generation = int(config.get("generation", 0))
        last, self.generation = getattr(self, "generation", None), generation
        if last is None or last == generation:  # the first call: __init__ opened the newest version already
            return
        answer = answer_in_process(self.servicer, "Reload", pb.ReloadRequest(), None)
        if answer[0] != "ok":
            logger.error("reload (generation %d) failed: %s: %s", generation, answer[1], answer[2])

    def check_health(self) -> None:
        """Serve calls this every few seconds: read a chunk, count a token, search one vector. A
        replica that cannot is restarted, and no call is routed to it meanwhile."""
        b = self.servicer.b
        probes = []
        live = _first_live_chunk(b.datastore) if b.datastore is not None else None
        if live is not None:  # a deleted document's chunk is refused (FAILED_PRECONDITION): probe a live one
            probes.append(("GetChunks", pb.GetChunksRequest(chunk_ids=[live], fetch=pb.Fetch(tokens=True))))
        if b.ngram is not None:
            probes.append(("Count", pb.NgramRequest(query=pb.NgramQuery(ids=pb.TokenIds(ids=[0])))))
        if b.dense is not None and b.dense.ntotal:
            probes.append(("Search", pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=[0.0] * b.dense.dim))], k=1)))
        for method, req in probes:
            answer = answer_in_process(self.servicer, method, req, 10.0)
            if answer[0] != "ok":
                raise RuntimeError(f"health probe {method} failed: {answer[1]}: {answer[2]}")

    def whoami(self) -> tuple[str, int]:
        """This replica's actor name and process id (tests kill one by name)."""
        import ray

        return ray.get_runtime_context().get_actor_name(), os.getpid()


class FanOutReplica:
    """One replica of the fan-out: the router over the shard deployments' handles."""

    STARTUP_S = 600.0  # shard replicas may still be loading their indexes when the fan-out starts

    async def __init__(self, cfg: ServerConfig, names: list[str], *handles: Any) -> None:
        import asyncio

        # the constructor runs on the replica's event loop, where blocking on a handle is refused
        await asyncio.to_thread(self._connect, cfg, names, handles)

    def _connect(self, cfg: ServerConfig, names: list[str], handles: tuple) -> None:
        from retromem.service.router import RouterServicer

        stubs = {SERVE_TARGET + n: HandleStub(h, f"shard {SERVE_TARGET + n}") for n, h in zip(names, handles)}
        for stub in stubs.values():  # wait until every shard answers (their replicas load first)
            stub.Info(pb.InfoRequest(), timeout=self.STARTUP_S)
        self.error: str | None = None
        self.servicer = None
        try:
            self.servicer = RouterServicer(cfg, None, connect=lambda target: (stubs[target], _NoChannel()))
        except ConfigError as exc:  # the deployment's placement is wrong: the driver reads it and stops the app
            self.error = str(exc)

    def placement_error(self) -> str | None:
        return self.error

    async def reconfigure(self, config: Mapping[str, Any]) -> None:
        """A new ``generation`` (after the shards' own): the router's Reload, whose answer the next
        ``Reload`` call returns. Off the event loop: it waits on the shards' handles."""
        import asyncio

        generation = int(config.get("generation", 0))
        last, self.generation = getattr(self, "generation", None), generation
        if last is None or last == generation or self.servicer is None:
            self.reloaded = None
            return
        self.reloaded = await asyncio.to_thread(answer_in_process, self.servicer, "Reload", pb.ReloadRequest(),
                                                RELOAD_TIMEOUT_S)

    def call(self, method: str, request: Any, timeout: float | None) -> tuple:
        if self.servicer is None:
            return "error", "FAILED_PRECONDITION", f"the deployment is refused: {self.error}"
        if method == "Reload":  # done by reconfigure on every fan-out replica; this is its outcome
            return self.reloaded or ("error", "FAILED_PRECONDITION", "Reload goes through the gRPC front, which "
                                                                      "redeploys the application with a new generation")
        return answer_in_process(self.servicer, method, request, timeout)


# ---------------------------------------------------------------------------------------------
# the application and its gRPC front


def shard_config(spec: ShardSpec, cfg: ServerConfig) -> ServerConfig:
    """The ServerConfig one shard replica opens: its paths, the front's limits and batching."""
    return ServerConfig(datastore=spec.datastore, dense=spec.dense, ngram=spec.ngram, port=0, workers=cfg.workers,
                        max_queue=cfg.max_queue, batch_wait_ms=cfg.batch_wait_ms, max_dense_batch=cfg.max_dense_batch,
                        torch_threads=cfg.torch_threads, faiss_threads=cfg.faiss_threads, limits=cfg.limits)


def build_app(dep: RayDeployment, cfg: ServerConfig, health_check_period_s: float = 5.0, *,
              shard_generation: int = 0, fanout_generation: int = 0) -> Any:
    """The Serve application: one deployment per shard and the fan-out (its ingress). The
    generations go in each deployment's ``user_config``: raising one is a Reload of those replicas."""
    import hashlib

    from ray import serve

    # the fan-out never sees the front's secrets: it needs only to know whether a token is asked for
    fan_cfg = dataclasses.replace(cfg, token=None, tls_cert=None, tls_key=None, shard_token=None, shard_tls_ca=None)
    # a fixed code version for this description, so that a redeploy changing only user_config
    # reconfigures the running replicas in place (not `fanout_in_front`: where the front merges changes
    # no deployment). Serve draws a random version for each serve.run otherwise, and then replaces every
    # replica (one by one: still a reload, each new replica opening the newest version, only slower)
    what = (dep.shards, dep.fanout, dep.app, fan_cfg, health_check_period_s)
    version = hashlib.sha256(repr(what).encode()).hexdigest()[:16]

    def versioned(d: Any) -> Any:
        try:  # the switch Serve's own config deploys use; `version` alone is refused since Ray 2.x
            return d.options(version=version, _internal=True)
        except (TypeError, ValueError):  # a Ray without it: replicas replaced on each Reload
            return d

    health = {"health_check_period_s": health_check_period_s, "health_check_timeout_s": 30.0}
    shard = serve.deployment(ShardReplica)
    bound = [versioned(shard.options(name=s.deployment, **s.scaling.options(), **health,
                                     user_config={"generation": shard_generation})).bind(shard_config(s, cfg))
             for s in dep.shards]
    fanout = versioned(serve.deployment(FanOutReplica).options(name=FANOUT, **dep.fanout.options(), **health,
                                                               user_config={"generation": fanout_generation}))
    return fanout.bind(fan_cfg, [s.name for s in dep.shards], *bound)


class Redeployer:
    """Runs (and re-runs) the application of a deployment description: :meth:`run` deploys it,
    :meth:`reload_shards` and :meth:`reload_fanout` redeploy it with the next generation of the
    shards' or the fan-out's ``user_config`` (see :func:`build_app`); one at a time."""

    def __init__(self, dep: RayDeployment, cfg: ServerConfig, health_check_period_s: float = 5.0) -> None:
        import threading

        self.dep, self.cfg, self.health_check_period_s = dep, cfg, health_check_period_s
        self.shard_generation = self.fanout_generation = 0
        self.lock = threading.Lock()

    def run(self) -> Any:
        """``serve.run`` of the application at the current generations; the fan-out's handle once
        every replica is up (and reconfigured)."""
        from ray import serve

        # no access log: a line per call per replica would cost CPU on every hop and fill the log directory
        return serve.run(build_app(self.dep, self.cfg, self.health_check_period_s, shard_generation=self.shard_generation,
                                   fanout_generation=self.fanout_generation),
                         name=self.dep.app, route_prefix=None, logging_config={"enable_access_log": False})

    def reload_shards(self) -> None:
        self.shard_generation += 1
        self.run()

    def reload_fanout(self) -> None:
        self.fanout_generation += 1
        self.run()


class FrontServicer(pb_grpc.RetrievalServicer):
    """The ``retromem.v1.Retrieval`` service of the gRPC front: every call goes to the fan-out
    deployment and comes back as its message or status code."""

    def __init__(self, cfg: ServerConfig, fanout: Any, metrics: Any = None, redeployer: Redeployer | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._stub = HandleStub(fanout, "the fan-out")
        self._redeployer = redeployer
        for name, m in _METHODS.items():
            if not m.client_streaming and not m.server_streaming:
                setattr(self, name, self._unary(name))
        self.Reload = self._reload

    def reload(self) -> None:
        """Every shard replica re-opens its shard, then every fan-out replica re-places the shards
        (two lightweight redeploys, one after the other); what SIGHUP runs."""
        if self._redeployer is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this front was started without its "
                                                                   "application's description: Reload cannot redeploy it")
        with self._redeployer.lock:
            self._redeployer.reload_shards()
            self._redeployer.reload_fanout()

    def _reload(self, request, context):
        """:meth:`reload`; the answer is the fan-out's Reload (sizes, deleted documents, or the shard
        that failed to re-open and still serves its previous version)."""
        t0 = time.perf_counter()
        try:
            self.reload()
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:  # Serve could not apply the new generation
            context.abort(grpc.StatusCode.UNAVAILABLE, f"Reload: redeploying the application failed: "
                                                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        try:
            answer = self._stub.Reload(request, timeout=context.time_remaining())
        except RemoteStatus as exc:
            context.abort(exc.code(), exc.details())
        answer.seconds = time.perf_counter() - t0
        return answer

    def _unary(self, method: str):
        def handler(request, context):
            try:
                answer = getattr(self._stub, method)(request, timeout=context.time_remaining())
            except RemoteStatus as exc:
                context.abort(exc.code(), exc.details())
            if method == "Info":  # the fan-out was not given the token: say whether the front asks for one
                answer.auth_required = self.cfg.token is not None
            return answer

        handler.__name__ = method
        return handler

    def SearchStream(self, request_iterator, context):
        def answer(r, req):
            try:
                return self._stub.stream_answer((r, req), timeout=context.time_remaining())
            except RemoteStatus as exc:
                raise ServiceError(exc.code(), exc.details()) from None

        yield from stream_search(request_iterator, context, answer, self.cfg.limits.max_message_bytes, self.metrics)

    def close(self) -> None:
        pass


def front_servicer(dep: RayDeployment, cfg: ServerConfig, fanout: Any, redeployer: Redeployer | None = None) -> Any:
    """The front's servicer: a thin one over the fan-out deployment, or with ``fanout.in_front`` the
    router itself over the shards' handles. ``redeployer``: what Reload redeploys (default: ``dep``
    at generation 0, as :func:`deploy` ran it)."""
    redeployer = redeployer or Redeployer(dep, cfg)
    if not dep.fanout_in_front:
        return FrontServicer(cfg, fanout, redeployer=redeployer)
    from ray import serve

    from retromem.service.router import RouterServicer

    class InFrontRouter(RouterServicer):
        def Reload(self, request, context):
            """Every shard replica re-opens its shard (a lightweight redeploy), then this router's own
            Reload re-reads and re-places them."""
            with redeployer.lock:
                try:
                    redeployer.reload_shards()
                except Exception as exc:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"Reload: redeploying the application failed: "
                                                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                return super().Reload(request, context)

    stubs = {s.target: HandleStub(serve.get_deployment_handle(s.deployment, app_name=dep.app), f"shard {s.target}")
             for s in dep.shards}
    return InFrontRouter(cfg, None, connect=lambda target: (stubs[target], _NoChannel()))


@dataclass
class RayService:
    """A running Serve application with its gRPC front (``front``: :class:`RunningServer`)."""

    dep: RayDeployment
    front: Any
    fanout: Any  # the fan-out's DeploymentHandle
    redeployer: Redeployer | None = None

    @property
    def target(self) -> str:
        return self.front.target

    def stop(self, grace: float | None = None, *, delete_app: bool = True) -> None:
        self.front.stop(grace)
        if delete_app:
            from ray import serve

            serve.delete(self.dep.app)


def deploy(dep: RayDeployment, cfg: ServerConfig, *, ray_address: str | None = None,
           health_check_period_s: float = 5.0, redeployer: Redeployer | None = None) -> Any:
    """Connect to Ray (``ray_address``, or the running/a new local instance) and deploy the
    application (through ``redeployer`` when given, which Reload then uses again); returns the
    fan-out's handle once every replica is up. A deployment whose placement the router refuses
    (overlapping ranges, a datastore id that is not what the shard serves) is deleted again and
    raised as :class:`ConfigError`."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # the gRPC front is the only way in
    t0 = time.perf_counter()
    fanout = (redeployer or Redeployer(dep, cfg, health_check_period_s)).run()
    error = fanout.placement_error.remote().result()
    if error:
        serve.delete(dep.app)
        raise ConfigError(f"--deployment: {error}")
    logger.info("Serve application %s up in %.1fs: %d shard deployments and the fan-out", dep.app,
                time.perf_counter() - t0, len(dep.shards))
    return fanout


def start_ray_service(dep: RayDeployment, cfg: ServerConfig, *, ray_address: str | None = None,
                      health_check_period_s: float = 5.0) -> RayService:
    """:func:`deploy`, then start the gRPC front on ``cfg``'s address; returns at once."""
    from retromem.service.server import start_server

    redeployer = Redeployer(dep, cfg, health_check_period_s)
    fanout = deploy(dep, cfg, ray_address=ray_address, redeployer=redeployer)
    try:
        front = start_server(cfg, servicer=front_servicer(dep, cfg, fanout, redeployer))
    except Exception:
        from ray import serve

        serve.delete(dep.app)
        raise
    return RayService(dep, front, fanout, redeployer)


def serve_ray(dep: RayDeployment, cfg: ServerConfig, *, ray_address: str | None = None, on_ready=None) -> int:
    """:func:`deploy`, serve the gRPC front until SIGTERM/SIGINT (then drain it as ``retromem serve``
    does) and delete the application; returns the calls abandoned at the stop."""
    from ray import serve

    from retromem.service.server import serve as run

    import ray

    started = not ray.is_initialized()
    try:
        redeployer = Redeployer(dep, cfg)
        fanout = deploy(dep, cfg, ray_address=ray_address, redeployer=redeployer)
        try:
            return run(cfg, on_ready=on_ready, servicer=front_servicer(dep, cfg, fanout, redeployer))
        finally:
            serve.delete(dep.app)
    finally:
        if started:  # a local Ray this process started goes with it (the command line exits without atexit)
            ray.shutdown()
