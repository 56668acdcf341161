using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;

namespace KernelLM.Tests.Cuda;

/// <summary>What the CUDA tests need from the machine, and the small kernel files they compile.</summary>
internal static class CudaTestSupport
{
    /// <summary>NVRTC is required (CI installs it): without it the test fails, saying how to install it.</summary>
    public static void RequireNvrtc()
    {
        if (!NvrtcCompiler.IsAvailable)
        {
            Assert.Fail($"NVRTC is not installed on this machine ({KernelLM.Native.NativeLibraries.Load(KernelLM.Native.NativeLibraries.Nvrtc).Describe()}); " +
                NvrtcCompiler.InstallHint);
        }
    }

    /// <summary>For tests that need a GPU: ignored (never passed) where there is none.</summary>
    public static CudaDeviceInfo RequireDevice()
    {
        var status = CudaDriverStatus.Current;
        if (status.Problem is not null)
        {
            Assert.Ignore(status.Problem.StartsWith("no CUDA device", StringComparison.Ordinal) ? status.Problem : $"no CUDA device: {status.Problem}");
        }
        return status.Devices[0];
    }

    public static bool HasDevice => CudaDriverStatus.Current.Devices.Count > 0;

    /// <summary>A kernel file written in the house style, using common.cuh's conversions and reductions.</summary>
    public static KernelSource TestKernels => new("test_kernels.cu", TestKernelsText, KernelSources.Headers)
    {
        EntryPoints = KernelSources.FindEntryPoints(TestKernelsText),
    };

    public const string TestKernelsText = """
        // test_kernels.cu: small kernels for the backend tests (not part of the engine).
        //   scale_bf16_f32:   y[i] = scale * x[i]            x: [n] bf16, y: [n] f32
        //   round_f32_bf16:   y[i] = bf16(x[i])              x: [n] f32,  y: [n] bf16 (round to nearest even)
        //   row_sum_f32:      y[r] = sum_c x[r, c]           x: [rows, cols] row-major f32, one block per row, fp32 accumulation
        //   shared_echo_f32:  y[i] = x[i] through dynamic shared memory (blockDim.x * sizeof(float) * copies bytes)
        #include "common.cuh"

        extern "C" __global__ void scale_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ y, float scale, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                y[i] = scale * bf16_to_float(x[i]);
            }
        }

        extern "C" __global__ void round_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                y[i] = float_to_bf16(x[i]);
            }
        }

        extern "C" __global__ void row_sum_f32(const float* __restrict__ x, float* __restrict__ y, int cols) {
            __shared__ float scratch[32];
            const float* row = x + (long long)blockIdx.x * cols;
            float sum = 0.0f;
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                sum += row[c];
            }
            sum = block_reduce_sum(sum, scratch);
            if (threadIdx.x == 0) {
                y[blockIdx.x] = sum;
            }
        }

        extern "C" __global__ void shared_echo_f32(const float* __restrict__ x, float* __restrict__ y, int copies) {
            KLM_DYNAMIC_SHARED(float, staging);
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            for (int copy = 0; copy < copies; copy++) {
                staging[copy * blockDim.x + threadIdx.x] = x[i];
            }
            __syncthreads();
            y[i] = staging[(copies - 1) * blockDim.x + threadIdx.x];
        }
        """;
}
