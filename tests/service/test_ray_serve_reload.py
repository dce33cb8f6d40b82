"""Reload on Ray Serve (``retromem serve --engine ray``): a document taken down after the deployment
started is served by no replica once a Reload went through the gRPC front, whichever replica a call
reaches (two replicas of the shard, many calls); counts equal the index's newest version in
process; the replicas were reconfigured in place (same processes), not replaced. Both with the
fan-out deployment and with the router in the front (``fanout.in_front``)."""

from __future__ import annotations

import dataclasses
import shutil
import uuid

import grpc
import pytest

from retromem.service.client import RetrievalClient, ServiceCallError


def _replicas(app: str, deployment: str, calls: int = 24) -> set:
    from ray import serve

    h = serve.get_deployment_handle(deployment, app_name=app)
    return {h.whoami.remote().result() for _ in range(calls)}


def _taken_down_everywhere(c: RetrievalClient, chunk: int, calls: int = 16) -> None:
    for _ in range(calls):  # two replicas behind the handle: each is reached with probability 1 - 2^-16
        with pytest.raises(ServiceCallError) as e:
            c.get_chunks([chunk])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow  # a local Ray, Serve, two shard replicas and three redeploys
def test_reload_reaches_every_replica(stores, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from ray import serve

    from retromem.datastore import Datastore
    from retromem.datastore.tombstones import delete
    from retromem.index.ngram import NgramIndex
    from retromem.service.ray_serve import front_servicer, parse_ray_deployment, start_ray_service
    from retromem.service.server import start_server

    root = tmp_path / "a"  # a copy: the session's shared stores stay as they are
    shutil.copytree(stores["a"].datastore, root / "ds")
    shutil.copytree(stores["a"].ngram, root / "ngram")
    ds = Datastore.open(root / "ds")
    chunk = {d: int(ds.doc_first_chunk_array[d]) for d in (1, 2)}
    app = f"r{uuid.uuid4().hex[:8]}"
    dep = parse_ray_deployment({"app": app, "shards": [
        {"name": "a", "datastore": str(root / "ds"), "ngram": str(root / "ngram"), "datastore_id": ds.datastore_id,
         "first_doc": 0, "first_chunk": 0, "replicas": 2, "num_cpus": 0}]})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    svc = front = None
    try:
        svc = start_ray_service(dep, dep.server_config(port=0, workers=4, shard_timeout_s=30), health_check_period_s=2)
        replicas = _replicas(app, "shard-a")
        assert len(replicas) == 2
        with RetrievalClient(svc.target, timeout=120) as c:
            assert c.get_chunks([chunk[1]])[0].doc_id == 1
            delete(root / "ds", doc_ids=[1], reason="test", who="test")
            assert c.get_chunks([chunk[1]])[0].doc_id == 1  # the version the replicas opened, until the Reload
            r = c.reload()
            assert (r.deleted_documents, r.num_chunks) == (1, ds.num_chunks)
            _taken_down_everywhere(c, chunk[1])
            newest = NgramIndex(root / "ngram")
            for q in (" the", " file"):
                assert {c.count(q).count for _ in range(8)} == {newest.count(q).count}
        assert _replicas(app, "shard-a") == replicas  # reconfigured in place: the same two processes

        # the router in the front's process: the shards re-open, then the front's router re-reads them
        cfg = svc.front.servicer.cfg
        front = start_server(cfg, servicer=front_servicer(dataclasses.replace(dep, fanout_in_front=True), cfg, None,
                                                          svc.redeployer))
        with RetrievalClient(front.target, timeout=120) as c:
            delete(root / "ds", doc_ids=[2], reason="test", who="test")
            r = c.reload()
            assert (r.deleted_documents, r.num_chunks) == (2, ds.num_chunks)
            _taken_down_everywhere(c, chunk[2])
            _taken_down_everywhere(c, chunk[1], calls=4)
        assert _replicas(app, "shard-a") == replicas
    finally:
        if front is not None:
            front.stop(0)
        if svc is not None:
            svc.stop(0)
        serve.shutdown()
        ray.shutdown()
