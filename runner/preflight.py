"""Check the per-trial resource request against the Ray cluster before any trial starts.

Ray Tune leaves a trial PENDING, with a warning, while no node can meet its request. On a
cluster that does not grow, a launch asking for more than any node has would wait indefinitely.
`fit_resources` turns that into a ConfigError naming the key, in seconds. It is a pure function
over node resource dicts, so tests need no Ray, and `cluster_nodes` reads those dicts from a
running Ray.
"""

import logging
from collections.abc import Mapping, Sequence

from anas.errors import ConfigError

log = logging.getLogger(__name__)


def fit_resources(request: Mapping, nodes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Return the per-trial resources to ask Ray for: {"cpu": ..., "gpu": ...}.

    `request` is the `resources` section of the config (cpu, gpu, cpu_fallback). `nodes` contains
    the resources of each alive node, as Ray names them ("CPU", "GPU"). Without any GPU in the
    cluster, a GPU request becomes 0 GPUs with one warning when `cpu_fallback` is true.
    Raises ConfigError naming `resources.cpu` or `resources.gpu` when no single node can ever
    meet the request of one trial.
    """
    cpu, gpu = float(request["cpu"]), float(request["gpu"])
    if gpu > 1 and not gpu.is_integer():
        raise ConfigError(
            f"resources.gpu: Ray accepts fractions of a GPU only below 1, got {gpu:g}; "
            "use a fraction below 1 or a whole number"
        )
    if not nodes:
        raise ConfigError("ray.address: the Ray cluster has no alive nodes")
    cpus = [float(node.get("CPU", 0)) for node in nodes]
    gpus = [float(node.get("GPU", 0)) for node in nodes]
    summary = _describe(cpus, gpus)

    if gpu > 0 and max(gpus) == 0:
        if not request["cpu_fallback"]:
            raise ConfigError(
                f"resources.gpu: each trial requests {gpu:g} GPU but the Ray cluster has none "
                f"({summary}); set resources.gpu=0, or resources.cpu_fallback=true to run on CPU"
            )
        log.warning(
            "resources.gpu: the Ray cluster has no GPU (%s), so trials run on CPU "
            "(resources.cpu_fallback is true)",
            summary,
        )
        gpu = 0.0
    elif gpu == 0 and max(gpus) > 0:
        log.info("resources.gpu is 0, so trials run on CPU although the cluster has GPUs")

    if any(c >= cpu and g >= gpu for c, g in zip(cpus, gpus, strict=True)):
        return {"cpu": cpu, "gpu": gpu}
    if max(cpus) < cpu:
        raise ConfigError(
            f"resources.cpu: each trial requests {cpu:g} CPUs but the largest node has "
            f"{max(cpus):g} ({summary}); lower resources.cpu"
        )
    if max(gpus) < gpu:
        raise ConfigError(
            f"resources.gpu: each trial requests {gpu:g} GPUs but the largest node has "
            f"{max(gpus):g} ({summary}); lower resources.gpu"
        )
    raise ConfigError(
        f"resources: no node has {cpu:g} CPUs and {gpu:g} GPUs together ({summary}); "
        "lower resources.cpu or resources.gpu"
    )


def _describe(cpus: list[float], gpus: list[float]) -> str:
    nodes = ", ".join(f"{c:g} CPU + {g:g} GPU" for c, g in zip(cpus, gpus, strict=True))
    return f"{len(cpus)} node{'s' if len(cpus) != 1 else ''}: {nodes}"


def cluster_nodes() -> list[dict[str, float]]:
    """Return the resources of every alive node of the Ray cluster this process is connected to.

    NOTE: an autoscaling cluster can add nodes later; these are the nodes present now.
    """
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_resources(cfg: dict) -> dict[str, float]:
    """Fit `cfg["resources"]` to the connected Ray cluster (see fit_resources)."""
    return fit_resources(cfg["resources"], cluster_nodes())
