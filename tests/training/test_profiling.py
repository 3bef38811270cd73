"""--profile --use-pytorch-profiler records the chosen steps and reports attention's share."""

from types import SimpleNamespace

from megatron.training.profiling import StepProfiler, attention_share
from tests.training.gpt_runs import run_gpt


def test_attention_share_sums_matching_kernels():
    events = [SimpleNamespace(key="void pytorch_flash::flash_fwd_kernel", self_device_time_total=3000.0,
                              device_type="DeviceType.CUDA"),
              SimpleNamespace(key="sm90_xmma_gemm_bf16", self_device_time_total=6000.0, device_type="DeviceType.CUDA"),
              SimpleNamespace(key="cudnn_generated_fort_native_sdpa_sm90", self_device_time_total=1000.0,
                              device_type="DeviceType.CUDA"),
              # an operator's entry repeats the time of the kernels it launched: not counted
              SimpleNamespace(key="aten::_scaled_dot_product_cudnn_attention", self_device_time_total=1000.0,
                              device_type="DeviceType.CPU")]
    assert attention_share(events) == (10.0, 4.0)


def test_profiler_is_off_unless_asked():
    args = SimpleNamespace(profile=False, profile_ranks=[0], profile_step_start=1, profile_step_end=2,
                           use_pytorch_profiler=True, tensorboard_dir=None)
    prof = StepProfiler(args, 0)
    prof.step_begin(1)
    assert prof.step_end(2) is None


def test_profiled_run_prints_the_summary(tmp_path):
    log = run_gpt(1, ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
                      "--profile-step-end", "3", "--tensorboard-dir", str(tmp_path)], iters=4)
    assert "profile of iterations 2-3: kernel time" in log
    assert (tmp_path / "trace_rank0.json").exists()
