import logging

import pytest

from anas.errors import ConfigError
from runner.preflight import check_resources, fit_resources

CPU_NODE = {"CPU": 2.0, "memory": 4e9, "node:127.0.0.1": 1.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}
TWO_GPU_NODE = {"CPU": 4.0, "GPU": 2.0}


def request(cpu=1.0, gpu=0.0, cpu_fallback=True) -> dict:
    return {"cpu": cpu, "gpu": gpu, "cpu_fallback": cpu_fallback}


def test_cpu_request_fits():
    assert fit_resources(request(cpu=2), [CPU_NODE]) == {"cpu": 2.0, "gpu": 0.0}


def test_fractional_gpu_fits():
    assert fit_resources(request(cpu=1, gpu=0.5), [GPU_NODE]) == {"cpu": 1.0, "gpu": 0.5}


def test_fractional_cpu_fits():
    assert fit_resources(request(cpu=0.5), [CPU_NODE]) == {"cpu": 0.5, "gpu": 0.0}


def test_whole_gpus_fit_larger_node():
    nodes = [GPU_NODE, TWO_GPU_NODE]
    assert fit_resources(request(cpu=2, gpu=2), nodes) == {"cpu": 2.0, "gpu": 2.0}


def test_gpu_fallback_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="runner.preflight")
    fitted = fit_resources(request(cpu=1, gpu=0.5), [CPU_NODE, CPU_NODE])
    assert fitted == {"cpu": 1.0, "gpu": 0.0}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "resources.gpu" in warnings[0].getMessage()


def test_gpu_without_fallback_rejected():
    with pytest.raises(ConfigError, match=r"^resources\.gpu: .*has none") as caught:
        fit_resources(request(gpu=1, cpu_fallback=False), [CPU_NODE])
    assert "1 node: 2 CPU + 0 GPU" in str(caught.value)


def test_more_cpus_than_any_node_rejected():
    with pytest.raises(ConfigError, match=r"^resources\.cpu: ") as caught:
        fit_resources(request(cpu=4), [CPU_NODE, CPU_NODE])
    message = str(caught.value)
    assert "requests 4 CPUs" in message
    assert "largest node has 2" in message
    assert "2 nodes" in message


def test_more_gpus_than_any_node_rejected():
    with pytest.raises(ConfigError, match=r"^resources\.gpu: .*largest node has 2"):
        fit_resources(request(cpu=1, gpu=3), [GPU_NODE, TWO_GPU_NODE])


def test_cpu_and_gpu_on_different_nodes_rejected():
    # 8 CPUs exist on one node and 2 GPUs on another, but never together.
    with pytest.raises(ConfigError, match=r"^resources: no node has 8 CPUs and 2 GPUs"):
        fit_resources(request(cpu=8, gpu=2), [GPU_NODE, TWO_GPU_NODE])


def test_gpu_fraction_above_one_rejected():
    with pytest.raises(ConfigError, match=r"^resources\.gpu: .*below 1, got 1\.5"):
        fit_resources(request(gpu=1.5), [TWO_GPU_NODE])


def test_empty_cluster_rejected():
    with pytest.raises(ConfigError, match=r"^ray\.address: "):
        fit_resources(request(), [])


def test_fallback_then_cpu_checked():
    with pytest.raises(ConfigError, match=r"^resources\.cpu: "):
        fit_resources(request(cpu=3, gpu=1), [CPU_NODE])


@pytest.mark.slow
def test_reads_running_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    try:
        cfg = {"resources": request(cpu=1, gpu=0.5)}
        assert check_resources(cfg) == {"cpu": 1.0, "gpu": 0.0}
        with pytest.raises(ConfigError, match=r"^resources\.cpu: .*largest node has 1"):
            check_resources({"resources": request(cpu=2)})
    finally:
        ray.shutdown()
