"""--profile --use-pytorch-profiler records the chosen steps and reports attention's share and
where the device time goes."""

import json
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
    # The breakdown block follows the summary line and is saved next to the trace.
    assert "[Rank 0] profile | " in log.split("profile of iterations 2-3: kernel time", 1)[1]
    report = json.loads((tmp_path / "profile_rank0.json").read_text())
    assert (report["start_step"], report["end_step"], report["iterations"]) == (2, 3, 2)
    assert report["wall_ms_per_iteration"] > 0


def test_categorise_real_kernel_names():
    from megatron.training.profiling import categorise

    expected = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopB_NTN": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled (triton)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)"
        "::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication",
        "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL": "communication",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other elementwise",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>":
            "other elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copies",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, 128, 1>": "copies",
        "Memcpy HtoD (Pinned -> Device)": "copies",
        "Memset (Device)": "copies",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "softmax/cross-entropy",
        "void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "softmax/cross-entropy",
        "void at::native::index_elementwise_kernel<128, 4>": "other elementwise",
        "void at::native::_scatter_gather_elementwise_kernel<128, 4>": "other elementwise",
        "void rotary_embedding_kernel<float>": "other",
    }
    assert {name: categorise(name) for name in expected} == expected


def test_merged_busy_time_merges_overlaps_across_streams():
    from megatron.training.profiling import merged_busy_time

    assert merged_busy_time([]) == 0.0
    assert merged_busy_time([(0.0, 10.0), (20.0, 25.0)]) == 15.0          # disjoint
    assert merged_busy_time([(0.0, 10.0), (5.0, 12.0), (30.0, 31.0)]) == 13.0  # overlap
    assert merged_busy_time([(5.0, 12.0), (0.0, 20.0), (20.0, 22.0)]) == 22.0  # nested, touching, unsorted
    assert merged_busy_time([(3.0, 3.0)]) == 0.0


def test_breakdown_of_fake_kernels():
    from megatron.training.profiling import Kernel, breakdown, device_kernels, format_breakdown

    # Two iterations over 40 ms of wall time: a gemm on the compute stream, an all-reduce on
    # the communication stream overlapping it, attention and a memcpy.
    events = [
        SimpleNamespace(name="sm90_xmma_gemm_bf16bf16", device_type="DeviceType.CUDA",
                        time_range=SimpleNamespace(start=0.0, end=8000.0)),
        SimpleNamespace(name="ncclDevKernel_AllReduce_Sum_bf16_RING_LL", device_type="DeviceType.CUDA",
                        time_range=SimpleNamespace(start=4000.0, end=12000.0)),
        SimpleNamespace(name="sm90_xmma_gemm_bf16bf16", device_type="DeviceType.CUDA",
                        time_range=SimpleNamespace(start=20000.0, end=28000.0)),
        SimpleNamespace(name="cudnn_generated_fort_native_sdpa_sm90_flash_fprop", device_type="DeviceType.CUDA",
                        time_range=SimpleNamespace(start=28000.0, end=30000.0)),
        SimpleNamespace(name="Memcpy HtoD (Pinned -> Device)", device_type="DeviceType.CUDA",
                        time_range=SimpleNamespace(start=30000.0, end=30000.0 + 2000.0 * 0.5)),
        # not kernels: an operator on the CPU and a device-side annotation spanning the step
        SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU",
                        time_range=SimpleNamespace(start=0.0, end=9000.0)),
        SimpleNamespace(name="ProfilerStep#2", device_type="DeviceType.CUDA", is_user_annotation=True,
                        time_range=SimpleNamespace(start=0.0, end=40000.0)),
    ]
    kernels = device_kernels(events)
    assert [k.name for k in kernels] == [e.name for e in events[:5]]
    report = breakdown(kernels, steps=2, wall_ms=40.0)
    assert report["kernel_ms_per_iteration"] == 27.0 / 2       # 8 + 8 + 8 + 2 + 1 ms summed
    assert report["busy_ms_per_iteration"] == 23.0 / 2         # 12 + 8 + 2 + 1: the overlap counts once
    assert report["idle_ms_per_iteration"] == 17.0 / 2
    assert report["busy_percent"] == 100.0 * 23.0 / 40.0
    categories = {c["category"]: c["ms_per_iteration"] for c in report["categories"]}
    assert categories == {"gemm": 8.0, "communication": 4.0, "attention": 1.0, "copies": 0.5}
    top = report["top_kernels"]
    assert top[0]["name"] == "sm90_xmma_gemm_bf16bf16" and top[0]["calls_per_iteration"] == 1.0
    assert top[0]["percent"] == 100.0 * 16.0 / 27.0
    # Without a wall time the window is the kernels' span (0 .. 31 ms).
    assert breakdown(kernels, steps=2)["wall_ms_per_iteration"] == 31.0 / 2
    long_name = "x" * 200
    lines = format_breakdown(breakdown(kernels + [Kernel(long_name, 40000.0, 40100.0)], steps=2, wall_ms=50.0), 3)
    assert all(line.startswith("[Rank 3] profile |") for line in lines)
    assert lines[0].startswith("[Rank 3] profile | GPU busy 46.2% of wall, idle 13.4 ms/iteration")
    assert any(line.endswith("x" * 87 + "...") for line in lines)
    assert format_breakdown(breakdown([], steps=2, wall_ms=10.0), 0) == [
        "[Rank 0] profile | no device kernels recorded (wall 5.0 ms/iteration)"]
