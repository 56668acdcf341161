using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>
/// Kernel bugs the emulator must report rather than compute through: out-of-bounds accesses (caught at the
/// access, or by the guard comparison after the launch for writes the checks cannot see), missing
/// barriers (shared-memory races), overlapping writes of different blocks, warp operations with a lane
/// missing from the mask or diverged lanes, barriers not reached by every thread, misaligned and null
/// accesses. Every report names the kernel; accesses also name the source line and the allocation.
/// </summary>
[TestFixture]
public sealed class EmulatorFaultTests
{
    private const string FileName = "emulator_faults.cu";

    private const string Kernels = """
        #include "common.cuh"

        extern "C" __global__ void write_one_past_the_end(float* y, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i <= n) {
                y[i] = 1.0f;
            }
        }

        extern "C" __global__ void read_one_past_the_end(const float* x, float* y, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                y[i] = x[i + 1];
            }
        }

        __device__ __forceinline__ float load_at(const float* p, int i) {
            return p[i];
        }

        extern "C" __global__ void read_through_helper(const float* x, float* y, int n) {
            int i = threadIdx.x;
            y[i] = load_at(x, i + n);
        }

        // memset is not instrumented: only the guard comparison after the launch sees this write.
        extern "C" __global__ void memset_past_the_end(float* y, int n, int bytes) {
            if (blockIdx.x == 0 && threadIdx.x == 0) {
                memset(y + n, 0x42, bytes);
            }
        }

        // The classic shared-memory tree reduction of blockDim.x (256) values; barrier = 0 drops the
        // __syncthreads between its steps.
        extern "C" __global__ void tree_sum(const float* x, float* out, int barrier) {
            __shared__ float partial[256];
            partial[threadIdx.x] = x[threadIdx.x];
            __syncthreads();
            for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
                if (threadIdx.x < stride) {
                    partial[threadIdx.x] += partial[threadIdx.x + stride];
                }
                if (barrier) {
                    __syncthreads();
                }
            }
            if (threadIdx.x == 0) {
                out[0] = partial[0];
            }
        }

        // Rewrites a shared value others are still reading (the barrier after the read is missing).
        extern "C" __global__ void scratch_reuse_without_barrier(const float* x, float* out) {
            __shared__ float scratch;
            if (threadIdx.x == 0) {
                scratch = x[0];
            }
            __syncthreads();
            float first = scratch;
            if (threadIdx.x == 0) {
                scratch = x[1];
            }
            __syncthreads();
            out[threadIdx.x] = first + scratch;
        }

        // An indexing bug no single block shows: every block writes the same outputs.
        extern "C" __global__ void blocks_overlap(float* y) {
            y[threadIdx.x] = (float)blockIdx.x;
        }

        extern "C" __global__ void shuffle_reads_lane_outside_mask(const float* x, float* y) {
            int lane = threadIdx.x;
            float v = x[lane];
            if (lane != 31) {
                v += __shfl_xor_sync(0x7fffffffu, v, 16);
            }
            y[lane] = v;
        }

        extern "C" __global__ void shuffle_lane_skips(const float* x, float* y) {
            int lane = threadIdx.x;
            float v = x[lane];
            if (lane != 7) {
                v = warp_reduce_sum(v);
            }
            y[lane] = v;
        }

        extern "C" __global__ void shuffle_diverged(const float* x, float* y) {
            int lane = threadIdx.x;
            float v = x[lane];
            if (lane < 16) {
                v += __shfl_xor_sync(KLM_FULL_MASK, v, 1);
            } else {
                v += __shfl_xor_sync(KLM_FULL_MASK, v, 2);
            }
            y[lane] = v;
        }

        extern "C" __global__ void full_mask_reduce(const float* x, float* y) {
            y[threadIdx.x] = warp_reduce_sum(x[threadIdx.x]);
        }

        extern "C" __global__ void early_return_before_barrier(const float* x, float* y, int n) {
            __shared__ float tile[64];
            int i = threadIdx.x;
            if (i >= n) {
                return;
            }
            tile[i] = x[i];
            __syncthreads();
            y[i] = tile[n - 1 - i];
        }

        extern "C" __global__ void barrier_in_divergent_code(float* y) {
            if (threadIdx.x < 32) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            y[threadIdx.x] = 1.0f;
        }

        extern "C" __global__ void misaligned_float_load(const float* x, float* y) {
            const float* p = (const float*)((const char*)x + 2);
            y[threadIdx.x] = p[threadIdx.x];
        }

        extern "C" __global__ void past_dynamic_shared(float* y, int count) {
            KLM_DYNAMIC_SHARED(float, s);
            s[threadIdx.x] = 1.0f;
            __syncthreads();
            y[threadIdx.x] = s[threadIdx.x + count];
        }

        extern "C" __global__ void device_assert(int value) {
            assert(value == 0);
        }
        """;

    private EmulatorBackend _device = null!;
    private IKernelModule _module = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _device = new EmulatorBackend(EmulatorTestSupport.Options);
        _module = _device.LoadModule(EmulatorTestSupport.Source(FileName, Kernels));
    }

    [OneTimeTearDown]
    public void TearDown()
    {
        _module.Dispose();
        _device.Dispose();
    }

    [TearDown]
    public void EveryAllocationFreed() => Assert.That(_device.LiveAllocations, Is.Zero, "device allocations leaked by the test");

    private static int LineOf(string text) =>
        Kernels.Split('\n').Select((line, index) => (line, index)).Single(pair => pair.line.Contains(text, StringComparison.Ordinal)).index + 1;

    private CudaException Fails(string kernel, Dim3 grid, Dim3 block, int dynamicSharedBytes, params ReadOnlySpan<KernelArgument> arguments)
    {
        var launch = arguments.ToArray();
        var error = Assert.Throws<CudaException>(() => _device.Run(_module, kernel, grid, block, dynamicSharedBytes, launch))!;
        TestContext.Out.WriteLine($"{error.ErrorName}: {error.Message}");
        Assert.That(error.Message, Does.Contain($"kernel '{kernel}' ({FileName})"));
        Assert.That(error.FileName, Is.EqualTo(FileName));
        return error;
    }

    [Test]
    public void Out_of_bounds_write_is_caught_at_the_access_with_line_thread_and_allocation()
    {
        const int n = 100;
        using var y = DeviceBuffer.Of<float>(_device, n);
        var error = Fails("write_one_past_the_end", new Dim3(1), new Dim3(128), 0, y, n);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        Assert.That(error.Message, Does.Contain("out-of-bounds write of 4 bytes"));
        Assert.That(error.Message, Does.Contain("thread (100,0,0) of block (0,0,0)"));
        Assert.That(error.Message, Does.Contain($"0 bytes past the end of allocation #").And.Contain("(400 bytes at 0x"));
        Assert.That(error.Message, Does.Contain($"{FileName}:{LineOf("y[i] = 1.0f;")} (write_one_past_the_end)"));
    }

    [Test]
    public void Out_of_bounds_read_is_caught_too()
    {
        const int n = 64;
        using var x = DeviceBuffer.Of<float>(_device, n);
        using var y = DeviceBuffer.Of<float>(_device, n);
        var error = Fails("read_one_past_the_end", new Dim3(1), new Dim3(64), 0, x, y, n);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        Assert.That(error.Message, Does.Contain("out-of-bounds read of 4 bytes").And.Contain("thread (63,0,0)"));
        Assert.That(error.Message, Does.Contain($"{FileName}:{LineOf("y[i] = x[i + 1];")}"));
    }

    [Test]
    public void Fault_inside_an_inlined_helper_names_the_helper_and_the_kernel_line()
    {
        using var x = DeviceBuffer.Of<float>(_device, 32);
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("read_through_helper", new Dim3(1), new Dim3(32), 0, x, y, 1);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        Assert.That(error.Message, Does.Contain(
            $"[at {FileName}:{LineOf("return p[i];")} (load_at), inlined in {FileName}:{LineOf("y[i] = load_at(x, i + n);")} (read_through_helper)]"));
    }

    [Test]
    public void Write_the_checks_cannot_see_is_caught_by_the_guard_comparison_after_the_launch()
    {
        const int n = 10;
        using var y = DeviceBuffer.Of<float>(_device, n);
        var error = Fails("memset_past_the_end", new Dim3(1), new Dim3(32), 0, y, n, 8);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.GuardCorrupted));
        Assert.That(error.Message, Does.Contain("the guard after allocation #").And.Contain("(40 bytes at 0x"));
        Assert.That(error.Message, Does.Contain("changed at offset 40, 0 bytes past its end"));
        // The guard is restored once reported: the next launch is clean.
        _device.Run(_module, "write_one_past_the_end", new Dim3(1), new Dim3(8), 0, y, n - 1);
    }

    [Test]
    public void Missing_syncthreads_in_a_tree_reduction_is_reported_as_a_shared_memory_race()
    {
        float[] values = Enumerable.Range(0, 256).Select(i => (float)(i % 17)).ToArray();
        using var x = DeviceBuffer.From<float>(_device, values);
        using var sum = DeviceBuffer.Of<float>(_device, 1);
        _device.Run(_module, "tree_sum", new Dim3(1), new Dim3(256), 0, x, sum, 1);
        Assert.That(sum.Read<float>(1)[0], Is.EqualTo(values.Sum()), "with its barriers the reduction is right");

        var error = Fails("tree_sum", new Dim3(1), new Dim3(256), 0, x, sum, 0);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Race));
        Assert.That(error.Message, Does.Contain("race on shared memory"));
        Assert.That(error.Message, Does.Contain("with no __syncthreads"));
        Assert.That(error.Message, Does.Contain($"{FileName}:{LineOf("partial[threadIdx.x] += partial[threadIdx.x + stride];")} (tree_sum)"));
    }

    [Test]
    public void Overwriting_shared_scratch_still_being_read_is_a_write_after_read_race()
    {
        using var x = DeviceBuffer.From<float>(_device, [1f, 2f]);
        using var y = DeviceBuffer.Of<float>(_device, 64);
        var error = Fails("scratch_reuse_without_barrier", new Dim3(1), new Dim3(64), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Race));
        Assert.That(error.Message, Does.Contain("race on shared memory"));
    }

    [Test]
    public void Blocks_writing_the_same_outputs_are_a_race_between_blocks()
    {
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("blocks_overlap", new Dim3(2), new Dim3(32), 0, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Race));
        Assert.That(error.Message, Does.Contain("write-after-write race on device memory"));
        Assert.That(error.Message, Does.Contain("of block (0,0,0), another block of this launch"));
        Assert.That(error.Message, Does.Contain("of block (1,0,0)"));
    }

    [Test]
    public void Shuffle_reading_a_lane_outside_the_mask_is_reported()
    {
        using var x = DeviceBuffer.Of<float>(_device, 32);
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("shuffle_reads_lane_outside_mask", new Dim3(1), new Dim3(32), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.WarpSync));
        Assert.That(error.Message, Does.Contain("__shfl_xor_sync").And.Contain("mask 0x7fffffff"));
        Assert.That(error.Message, Does.Contain("lane 15 of warp 0 reads lane 31, which is not in the mask"));
    }

    [Test]
    public void Lane_named_in_the_mask_that_never_joins_is_reported()
    {
        using var x = DeviceBuffer.Of<float>(_device, 32);
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("shuffle_lane_skips", new Dim3(1), new Dim3(32), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.WarpSync));
        Assert.That(error.Message, Does.Contain("lane 7").And.Contain("exited"));
        Assert.That(error.Message, Does.Contain("__shfl_xor_sync (common.cuh:"));
    }

    [Test]
    public void Shuffles_at_different_call_sites_are_a_diverged_warp()
    {
        using var x = DeviceBuffer.Of<float>(_device, 32);
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("shuffle_diverged", new Dim3(1), new Dim3(32), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.WarpSync));
        Assert.That(error.Message, Does.Contain("diverged warp 0"));
        Assert.That(error.Message, Does.Contain($"{FileName}:{LineOf("v += __shfl_xor_sync(KLM_FULL_MASK, v, 1);")}"));
        Assert.That(error.Message, Does.Contain($"{FileName}:{LineOf("v += __shfl_xor_sync(KLM_FULL_MASK, v, 2);")}"));
    }

    [Test]
    public void Full_mask_in_a_block_that_is_not_a_multiple_of_32_is_reported()
    {
        using var x = DeviceBuffer.Of<float>(_device, 48);
        using var y = DeviceBuffer.Of<float>(_device, 48);
        var error = Fails("full_mask_reduce", new Dim3(1), new Dim3(48), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.WarpSync));
        Assert.That(error.Message, Does.Contain("names lanes 16-31 of warp 1, which do not exist"));
    }

    [Test]
    public void Early_return_before_syncthreads_is_reported()
    {
        const int n = 40;
        using var x = DeviceBuffer.Of<float>(_device, 64);
        using var y = DeviceBuffer.Of<float>(_device, 64);
        var error = Fails("early_return_before_barrier", new Dim3(1), new Dim3(64), 0, x, y, n);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Barrier));
        Assert.That(error.Message, Does.Contain("every thread of a block must reach every barrier"));
    }

    [Test]
    public void Syncthreads_at_different_call_sites_is_reported()
    {
        using var y = DeviceBuffer.Of<float>(_device, 64);
        var error = Fails("barrier_in_divergent_code", new Dim3(1), new Dim3(64), 0, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Barrier));
        Assert.That(error.Message, Does.Contain("wait at different barriers"));
    }

    [Test]
    public void Misaligned_access_is_reported_as_on_the_gpu()
    {
        using var x = DeviceBuffer.Of<float>(_device, 64);
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("misaligned_float_load", new Dim3(1), new Dim3(32), 0, x, y);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.MisalignedAddress));
        Assert.That(error.Message, Does.Contain("misaligned read of 4 bytes"));
    }

    [Test]
    public void Access_past_the_dynamic_shared_memory_of_the_launch_is_reported()
    {
        using var y = DeviceBuffer.Of<float>(_device, 32);
        var error = Fails("past_dynamic_shared", new Dim3(1), new Dim3(32), 32 * sizeof(float), y, 32);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        // Which thread faults first depends on the schedule; all read at offsets 128..252.
        Assert.That(error.Message, Does.Contain("out-of-bounds read of 4 bytes at dynamic shared memory offset"));
        Assert.That(error.Message, Does.Contain("the launch has 128 bytes of dynamic shared memory"));
    }

    [Test]
    public void Null_pointer_and_use_after_free_are_reported()
    {
        var error = Fails("blocks_overlap", new Dim3(1), new Dim3(32), 0, 0UL);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        Assert.That(error.Message, Does.Contain("(a null pointer)"));

        ulong freed;
        using (var y = DeviceBuffer.Of<float>(_device, 32))
        {
            freed = y.Address;
        }
        error = Fails("blocks_overlap", new Dim3(1), new Dim3(32), 0, freed);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.IllegalAddress));
        Assert.That(error.Message, Does.Contain("freed earlier: use after free"));
    }

    [Test]
    public void Device_assert_fails_the_launch_with_its_condition()
    {
        _device.Run(_module, "device_assert", new Dim3(1), new Dim3(32), 0, 0);
        var error = Fails("device_assert", new Dim3(1), new Dim3(32), 0, 1);
        Assert.That(error.ErrorName, Is.EqualTo(EmulatorErrors.Assert));
        Assert.That(error.Message, Does.Contain("assertion failed: value == 0"));
    }
}
