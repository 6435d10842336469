"""Connecting to Ray and sizing work to what the cluster has (a laptop, or GPU nodes)."""

from __future__ import annotations

import os
import sys
import time

from .errors import ErRayError


class ClusterError(ErRayError):
    pass


def connect(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local Ray once.

    A local Ray starts with its dashboard (on 127.0.0.1) by default: it is where a user watches jobs and metrics,
    and Ray Train V2 relies on its State API (without it Train's placement-group cleaner logs "State API may be
    temporarily unavailable" every few seconds, and Tune over Train hangs once a trial is stopped)."""
    import logging

    import ray

    from . import console

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Unless --verbose: worker processes' output stays in Ray's log files (the dashboard shows it) and er_ray tells
    # progress from this process; Ray's own INFO lines (start, Ray Data's plans and progress) are not printed.
    quiet = dict(log_to_driver=console.verbose(), logging_level=logging.INFO if console.verbose() else logging.WARNING)
    if not console.verbose():  # "Token authentication is enabled ...": the secure default, said at every start
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Credentials are not forwarded: a local Ray's workers inherit this process's environment (AWS_* included), and
    # a cluster's nodes have their own (an instance profile, cluster.yaml); forwarding keys in the runtime_env
    # would show them in the dashboard's job info.
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false",
                        **({"ER_RAY_HOME": os.environ["ER_RAY_HOME"]} if "ER_RAY_HOME" in os.environ else {})}}
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=env, **quiet)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=env, **quiet)
    except Exception as e:  # a Ray that cannot start (or be reached) is one line, not Ray's traceback
        where = os.environ.get("RAY_ADDRESS") or "a local Ray"
        raise ClusterError(f"could not start or join {where}: {type(e).__name__}: {str(e).splitlines()[0]}"
                           f"{' (see /tmp/ray/session_latest/logs)' if not os.environ.get('RAY_ADDRESS') else ''}") \
            from None
    console.quiet_ray()
    console.terminate_as_interrupt()


def on_one_machine() -> bool:
    """Whether Ray's work would stay on this machine: no cluster named by RAY_ADDRESS (as under `ray job submit`),
    and a Ray this process already joined has a single node."""
    if os.environ.get("RAY_ADDRESS"):
        return False
    # a process that never imported Ray has not joined one (and one run on its own process should not pay ~1 s to
    # import Ray for this question)
    ray = sys.modules.get("ray")
    return ray is None or not ray.is_initialized() or sum(1 for n in ray.nodes() if n.get("Alive")) <= 1


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many it removed.

    Trap (Ray Train V2 under Tune): a Train run's worker group reserves its CPUs in a placement group that the run's
    controller actor creates, and such a group outlives its creator until the *job* ends (Ray's lifetime rule for
    groups that are not detached). When ASHA stops a trial, the trial's process and its controller die; Train's
    PlacementGroupCleaner is to remove the group, but it learns of the controller's death through the State API
    (the dashboard), and when that is slow or down the group stays reserved with no worker in it while every later
    trial waits for its CPUs (seen: a study hung 20 minutes on 2 CPUs). The GCS itself records whether a group's
    creator actor is dead: the sweep's driver asks it after every trial and removes what nobody can use."""
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not ray.is_initialized():  # (get_runtime_context would start a local Ray to find no group in it)
        return 0
    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for pg in _placement_groups():
        creator = ray.ActorID(pg.creator_actor_id)
        # A group the driver made (Tune's trial groups) has no creator actor: the GCS marks it dead too.
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or creator.is_nil()
                or not pg.creator_actor_dead or pg.creator_job_id.hex() != job):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception:  # removed meanwhile (by Train's own cleaner)
            pass
    return removed


def release_ended_groups(timeout: float = 20.0) -> int:
    """After a sweep: wait (at most `timeout` s) for the worker groups its trials' controllers made to be removed
    or orphaned, and remove the orphans; returns how many it removed. Trap: a trial ends in Tune before its
    controller actor dies, so a check right at the end finds the group's creator alive, and the CPUs stay
    reserved for the rest of the job (a study's seed runs then waited for them: CI saw one such group)."""
    import ray
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    end, removed = time.monotonic() + timeout, 0
    while True:
        removed += release_orphaned_placement_groups()
        waiting = [pg for pg in _placement_groups()
                   if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached
                   and not ray.ActorID(pg.creator_actor_id).is_nil() and pg.creator_job_id.hex() == job]
        if not waiting or time.monotonic() > end:
            return removed
        time.sleep(0.5)


def _placement_groups():
    """The GCS's placement group table (creators included; needs no dashboard)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    return [gcs_pb2.PlacementGroupTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_placement_group_table()]


def _actor_classes() -> dict[str, str]:
    """Live actors' class names by id, from the State API (the dashboard); {} when it does not answer."""
    try:
        from ray.util.state import list_actors

        return {a.actor_id: a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                                                              timeout=5, raise_on_missing_output=False)}
    except Exception:
        return {}


def who_holds(resource: str = "CPU") -> str:
    """What holds the cluster's CPUs (or GPUs) now, in one line: each placement group's share with its name, job
    and creator, and what tasks and actors outside any group hold. For a run that waited too long for its workers."""
    import ray
    from ray.core.generated import gcs_pb2

    total, free = ray.cluster_resources().get(resource, 0), ray.available_resources().get(resource, 0)
    job, classes = ray.get_runtime_context().get_job_id(), _actor_classes()
    held, in_groups = [], 0.0
    for pg in _placement_groups():
        amount = sum(b.unit_resources.get(resource, 0) for b in pg.bundles)
        if pg.state != gcs_pb2.PlacementGroupTableData.CREATED or not amount:
            continue
        in_groups += amount
        owner = "this job" if pg.creator_job_id.hex() == job else f"job {pg.creator_job_id.hex()}"
        creator = ray.ActorID(pg.creator_actor_id)
        if not creator.is_nil():
            owner += f", made by {classes.get(creator.hex(), 'actor ' + creator.hex()[:8])}" + \
                (" (dead)" if pg.creator_actor_dead else "")
        name = pg.name or ray.PlacementGroupID(pg.placement_group_id).hex()[:8]
        held.append(f"placement group {name!r}: {amount:g} {resource} ({owner})")
    if (outside := total - free - in_groups) > 0.01:
        held.append(f"tasks and actors outside placement groups: {outside:g} {resource}")
    return f"{total:g} {resource} in the cluster, {free:g} free; " + ("; ".join(held) or "nothing holds them now")
