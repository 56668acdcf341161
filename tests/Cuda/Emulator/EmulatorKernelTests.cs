using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>
/// Correct kernels give correct results on the emulated device: indexing, grids in 1-3 dimensions,
/// common.cuh's warp and block reductions, warp intrinsics, static and dynamic shared memory, atomics
/// from many blocks, and the bf16/f16 conversions against the C# ones on edge values.
/// </summary>
[TestFixture]
public sealed class EmulatorKernelTests
{
    private const string Kernels = """
        #include "common.cuh"

        extern "C" __global__ void vector_add(const float* a, const float* b, float* c, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                c[i] = a[i] + b[i];
            }
        }

        // One block per row; blockDim.x a multiple of 32.
        extern "C" __global__ void row_reduce(const float* x, float* sums, float* maxima, int cols) {
            __shared__ float scratch[32];
            const float* row = x + (size_t)blockIdx.x * cols;
            float sum = 0.0f, maximum = -__int_as_float(0x7f800000);
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                sum += row[c];
                maximum = fmaxf(maximum, row[c]);
            }
            sum = block_reduce_sum(sum, scratch);
            maximum = block_reduce_max(maximum, scratch);
            if (threadIdx.x == 0) {
                sums[blockIdx.x] = sum;
                maxima[blockIdx.x] = maximum;
            }
        }

        // One warp per row of 32: every warp intrinsic once. out: [rows, 8] per row, lanes: [rows, 32, 2].
        extern "C" __global__ void warp_intrinsics(const float* x, float* out, int* lanes) {
            int lane = threadIdx.x;
            float v = x[blockIdx.x * 32 + lane];
            float sum = warp_reduce_sum(v);
            float maximum = warp_reduce_max(v);
            float down = v;
            for (int offset = 16; offset > 0; offset >>= 1) {
                down += __shfl_down_sync(KLM_FULL_MASK, down, offset);
            }
            unsigned ballot = __ballot_sync(KLM_FULL_MASK, v > 0.0f);
            int any = __any_sync(KLM_FULL_MASK, v > 2.5f);
            int all = __all_sync(KLM_FULL_MASK, v > -10.0f);
            int first = __shfl_sync(KLM_FULL_MASK, lane * 10, 3);
            int up = __shfl_up_sync(KLM_FULL_MASK, lane, 1);
            __syncwarp();
            if (lane == 0) {
                float* o = out + blockIdx.x * 8;
                o[0] = sum;
                o[1] = maximum;
                o[2] = down;
                o[3] = __uint_as_float(ballot);
                o[4] = (float)any;
                o[5] = (float)all;
                o[6] = (float)__reduce_add_sync(1u, 7u);
            }
            lanes[(blockIdx.x * 32 + lane) * 2] = first;
            lanes[(blockIdx.x * 32 + lane) * 2 + 1] = up;
        }

        // Dynamic shared memory of 2 * blockDim.x floats: y[i] = 3 * x[mirror of i within its block], 0 past n.
        extern "C" __global__ void mirror_through_shared(const float* x, float* y, int n) {
            KLM_DYNAMIC_SHARED(float, tile);
            int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
            float v = i < n ? x[i] : 0.0f;
            tile[t] = v;
            tile[blockDim.x + t] = 2.0f * v;
            __syncthreads();
            int m = blockDim.x - 1 - t;
            if (i < n) {
                y[i] = tile[m] + tile[blockDim.x + m];
            }
        }

        extern "C" __global__ void atomics(const int* values, int n, int* bins, int bin_count, float* total, int* maximum,
                                           unsigned* cas_count, unsigned long long* wide) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i >= n) {
                return;
            }
            int v = values[i];
            atomicAdd(&bins[v % bin_count], 1);
            atomicAdd(total, 0.5f);
            atomicMax(maximum, v);
            atomicAdd(wide, 1ull << 33);
            unsigned old = atomicAdd(cas_count, 0u);
            for (;;) {
                unsigned seen = atomicCAS(cas_count, old, old + 1u);
                if (seen == old) {
                    break;
                }
                old = seen;
            }
        }

        // 2-D grid of 16x16 blocks: out[cols, rows] = in[rows, cols]^T through a padded shared tile.
        extern "C" __global__ void transpose(const float* in, float* out, int rows, int cols) {
            __shared__ float tile[16][17];
            int x = blockIdx.x * 16 + threadIdx.x, y = blockIdx.y * 16 + threadIdx.y;
            if (x < cols && y < rows) {
                tile[threadIdx.y][threadIdx.x] = in[y * cols + x];
            }
            __syncthreads();
            int tx = blockIdx.y * 16 + threadIdx.x, ty = blockIdx.x * 16 + threadIdx.y;
            if (tx < rows && ty < cols) {
                out[ty * rows + tx] = tile[threadIdx.x][threadIdx.y];
            }
        }

        // 3-D grid and block: every thread writes its own coordinates once.
        extern "C" __global__ void coordinates(int* out) {
            int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
            int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
            int* o = out + (block * (blockDim.x * blockDim.y * blockDim.z) + thread) * 6;
            o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
            o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
        }

        extern "C" __global__ void narrow(const float* x, bf16_t* bf16, f16_t* f16, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                bf16[i] = float_to_bf16(x[i]);
                f16[i] = float_to_f16(x[i]);
            }
        }

        extern "C" __global__ void widen(const unsigned short* bits, float* from_bf16, float* from_f16, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) {
                bf16_t b = { bits[i] };
                f16_t h = { bits[i] };
                from_bf16[i] = bf16_to_float(b);
                from_f16[i] = f16_to_float(h);
            }
        }

        // 1024 threads (32 warps): block_reduce_sum and the counting barriers.
        extern "C" __global__ void big_block(const float* x, float* out, int* counts) {
            __shared__ float scratch[32];
            float v = x[threadIdx.x];
            float sum = block_reduce_sum(v, scratch);
            int positive = __syncthreads_count(v > 0.0f);
            int all = __syncthreads_and(v > -10.0f);
            int any = __syncthreads_or(v > 0.999f);
            if (threadIdx.x == 0) {
                out[0] = sum;
                counts[0] = positive;
                counts[1] = all;
                counts[2] = any;
            }
        }

        // blockDim.x = 100: a partial last warp, barriers, a shared-memory tree over 128 slots.
        extern "C" __global__ void odd_block_sum(const float* x, float* out) {
            __shared__ float partial[128];
            int t = threadIdx.x;
            partial[t] = x[t];
            if (t + blockDim.x < 128) {
                partial[t + blockDim.x] = 0.0f;
            }
            __syncthreads();
            for (int stride = 64; stride > 0; stride >>= 1) {
                if (t < stride) {
                    partial[t] += partial[t + stride];
                }
                __syncthreads();
            }
            if (t == 0) {
                out[0] = partial[0];
            }
        }

        // Sub-warp widths, two half-warp groups at one call site, __match_any_sync. out: [32, 6].
        extern "C" __global__ void sub_warp(const int* x, int* out) {
            int lane = threadIdx.x;
            int v = x[lane];
            int* o = out + lane * 6;
            o[0] = __shfl_sync(KLM_FULL_MASK, v, 2, 8);
            o[1] = __shfl_down_sync(KLM_FULL_MASK, v, 3, 8);
            o[2] = __shfl_up_sync(KLM_FULL_MASK, v, 2, 16);
            o[3] = __shfl_xor_sync(KLM_FULL_MASK, v, 5, 8);
            unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
            o[4] = __reduce_add_sync(half, v);
            o[5] = (int)__match_any_sync(KLM_FULL_MASK, v % 3);
        }

        extern "C" __global__ void uninitialized_shared(float* y) {
            __shared__ float never_written[32];
            y[threadIdx.x] = never_written[threadIdx.x];
        }
        """;

    private EmulatorBackend _device = null!;
    private IKernelModule _module = null!;

    [OneTimeSetUp]
    public void SetUp()
    {
        _device = new EmulatorBackend(EmulatorTestSupport.Options);
        _module = _device.LoadModule(EmulatorTestSupport.Source("emulator_tests.cu", Kernels));
    }

    [OneTimeTearDown]
    public void TearDown()
    {
        _module.Dispose();
        _device.Dispose();
    }

    [TearDown]
    public void EveryAllocationFreed() => Assert.That(_device.LiveAllocations, Is.Zero, "device allocations leaked by the test");

    private static float[] Random(int seed, int count, float scale = 1)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)((random.NextDouble() * 2 - 1) * scale)).ToArray();
    }

    [Test]
    public void Device_reports_itself_as_emulated()
    {
        Assert.That(_device.IsEmulated, Is.True);
        Assert.That(_device.DeviceName, Does.StartWith("emulated ("));
        Assert.That(_device.ComputeCapability, Is.EqualTo(90));
        Assert.That(_device.TotalMemoryBytes, Is.EqualTo(256L << 20));
    }

    [Test]
    public void vector_add_over_an_odd_size([Values(1, 1001)] int n)
    {
        float[] a = Random(1, n), b = Random(2, n);
        using var da = DeviceBuffer.From<float>(_device, a);
        using var db = DeviceBuffer.From<float>(_device, b);
        using var dc = DeviceBuffer.Of<float>(_device, n);
        _device.Run(_module, "vector_add", new Dim3((n + 127) / 128), new Dim3(128), 0, da, db, dc, n);
        float[] c = dc.Read<float>(n);
        Assert.That(c, Is.EqualTo(a.Zip(b, (x, y) => x + y).ToArray()));
    }

    [Test]
    public void block_reduce_sum_and_max_over_odd_rows()
    {
        const int rows = 5, cols = 1003;
        float[] x = Random(3, rows * cols);
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var sums = DeviceBuffer.Of<float>(_device, rows);
        using var maxima = DeviceBuffer.Of<float>(_device, rows);
        _device.Run(_module, "row_reduce", new Dim3(rows), new Dim3(256), 0, dx, sums, maxima, cols);
        float[] gotSums = sums.Read<float>(rows), gotMaxima = maxima.Read<float>(rows);
        for (int r = 0; r < rows; r++)
        {
            var row = x.AsSpan(r * cols, cols).ToArray();
            double expected = row.Sum(v => (double)v);
            // fp32 summation of `cols` terms in any order: |error| <= cols * 2^-24 * sum |x| (Higham's gamma_n).
            double tolerance = cols * Math.Pow(2, -24) * row.Sum(v => Math.Abs((double)v));
            Assert.That(gotSums[r], Is.EqualTo(expected).Within(tolerance), $"row {r} sum");
            Assert.That(gotMaxima[r], Is.EqualTo(row.Max()), $"row {r} max");
        }
    }

    [Test]
    public void warp_intrinsics_of_common_cuh_and_the_shim()
    {
        const int rows = 3;
        float[] x = Random(4, rows * 32, scale: 3);
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var dout = DeviceBuffer.Of<float>(_device, rows * 8);
        using var dlanes = DeviceBuffer.Of<int>(_device, rows * 64);
        _device.Run(_module, "warp_intrinsics", new Dim3(rows), new Dim3(32), 0, dx, dout, dlanes);
        float[] got = dout.Read<float>(rows * 8);
        int[] lanes = dlanes.Read<int>(rows * 64);
        for (int r = 0; r < rows; r++)
        {
            var row = x.AsSpan(r * 32, 32).ToArray();
            double sum = row.Sum(v => (double)v);
            uint ballot = 0;
            for (int lane = 0; lane < 32; lane++)
            {
                ballot |= row[lane] > 0 ? 1u << lane : 0;
            }
            Assert.That(got[r * 8], Is.EqualTo(sum).Within(1e-5), "warp_reduce_sum");
            Assert.That(got[r * 8 + 1], Is.EqualTo(row.Max()), "warp_reduce_max");
            Assert.That(got[r * 8 + 2], Is.EqualTo(sum).Within(1e-5), "__shfl_down_sync tree");
            Assert.That(BitConverter.SingleToUInt32Bits(got[r * 8 + 3]), Is.EqualTo(ballot), "__ballot_sync");
            Assert.That(got[r * 8 + 4], Is.EqualTo(row.Any(v => v > 2.5f) ? 1 : 0), "__any_sync");
            Assert.That(got[r * 8 + 5], Is.EqualTo(1), "__all_sync");
            Assert.That(got[r * 8 + 6], Is.EqualTo(7), "__reduce_add_sync with a one-lane mask");
            for (int lane = 0; lane < 32; lane++)
            {
                Assert.That(lanes[(r * 32 + lane) * 2], Is.EqualTo(30), "__shfl_sync from lane 3");
                Assert.That(lanes[(r * 32 + lane) * 2 + 1], Is.EqualTo(lane == 0 ? 0 : lane - 1), "__shfl_up_sync by 1");
            }
        }
    }

    [Test]
    public void dynamic_shared_memory_through_KLM_DYNAMIC_SHARED()
    {
        const int n = 300, block = 64;
        float[] x = Random(5, n);
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var dy = DeviceBuffer.Of<float>(_device, n);
        _device.Run(_module, "mirror_through_shared", new Dim3((n + block - 1) / block), new Dim3(block), 2 * block * sizeof(float), dx, dy, n);
        float[] y = dy.Read<float>(n);
        for (int i = 0; i < n; i++)
        {
            int mirror = i / block * block + (block - 1 - i % block);
            float expected = mirror < n ? 3 * x[mirror] : 0;
            Assert.That(y[i], Is.EqualTo(expected).Within(Math.Abs(expected) * 1e-6), $"y[{i}]");
        }
    }

    [Test]
    public void atomics_from_many_blocks()
    {
        const int n = 2000, binCount = 7;
        int[] values = Enumerable.Range(0, n).Select(i => (i * 7919) % 1000).ToArray();
        using var dvalues = DeviceBuffer.From<int>(_device, values);
        using var bins = DeviceBuffer.Of<int>(_device, binCount);
        using var total = DeviceBuffer.Of<float>(_device, 1);
        using var maximum = DeviceBuffer.Of<int>(_device, 1);
        using var casCount = DeviceBuffer.Of<uint>(_device, 1);
        using var wide = DeviceBuffer.Of<ulong>(_device, 1);
        foreach (var buffer in new[] { bins, total, maximum, casCount, wide })
        {
            _device.Memset(buffer.Address, 0, buffer.Bytes, stream: 0);
        }
        _device.Run(_module, "atomics", new Dim3((n + 63) / 64), new Dim3(64), 0, dvalues, n, bins, binCount, total, maximum, casCount, wide);
        int[] expectedBins = new int[binCount];
        foreach (int v in values)
        {
            expectedBins[v % binCount]++;
        }
        Assert.That(bins.Read<int>(binCount), Is.EqualTo(expectedBins), "atomicAdd(int)");
        Assert.That(total.Read<float>(1)[0], Is.EqualTo(n * 0.5f), "atomicAdd(float), exact: multiples of 0.5 up to 1000");
        Assert.That(maximum.Read<int>(1)[0], Is.EqualTo(values.Max()), "atomicMax(int)");
        Assert.That(casCount.Read<uint>(1)[0], Is.EqualTo((uint)n), "atomicCAS loop");
        Assert.That(wide.Read<ulong>(1)[0], Is.EqualTo((ulong)n << 33), "atomicAdd(unsigned long long)");
    }

    [Test]
    public void transpose_on_a_2d_grid_with_odd_sizes()
    {
        const int rows = 37, cols = 53;
        float[] input = Random(6, rows * cols);
        using var din = DeviceBuffer.From<float>(_device, input);
        using var dout = DeviceBuffer.Of<float>(_device, rows * cols);
        _device.Run(_module, "transpose", new Dim3((cols + 15) / 16, (rows + 15) / 16), new Dim3(16, 16), 0, din, dout, rows, cols);
        float[] output = dout.Read<float>(rows * cols);
        for (int r = 0; r < rows; r++)
        {
            for (int c = 0; c < cols; c++)
            {
                Assert.That(output[c * rows + r], Is.EqualTo(input[r * cols + c]), $"out[{c}, {r}]");
            }
        }
    }

    [Test]
    public void every_thread_of_a_3d_grid_runs_once_with_its_coordinates()
    {
        var grid = new Dim3(3, 2, 2);
        var block = new Dim3(4, 3, 2);
        int threads = (int)(grid.Count * block.Count);
        using var dout = DeviceBuffer.Of<int>(_device, threads * 6);
        _device.Run(_module, "coordinates", grid, block, 0, dout);
        int[] got = dout.Read<int>(threads * 6);
        int index = 0;
        for (int bz = 0; bz < grid.Z; bz++)
        for (int by = 0; by < grid.Y; by++)
        for (int bx = 0; bx < grid.X; bx++)
        for (int tz = 0; tz < block.Z; tz++)
        for (int ty = 0; ty < block.Y; ty++)
        for (int tx = 0; tx < block.X; tx++)
        {
            Assert.That(got.AsSpan(index * 6, 6).ToArray(), Is.EqualTo(new[] { bx, by, bz, tx, ty, tz }), $"thread {index}");
            index++;
        }
    }

    /// <summary>Edge values: zeros, NaN, infinities, the largest finite values, subnormals of both formats,
    /// values that overflow f16, and exact ties at each format's rounding position.</summary>
    private static float[] EdgeValues()
    {
        var values = new List<float>
        {
            0f, -0f, 1f, -1f, float.NaN, -float.NaN, float.PositiveInfinity, float.NegativeInfinity, float.MaxValue, float.MinValue,
            float.Epsilon, -float.Epsilon, 1e-40f, 1e-45f, 1.17549435e-38f, 65504f, 65519.99f, 65520f, 65536f, -70000f,
            6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, 8.940697e-08f, 3.0e-06f, 1e-10f, 3.14159265f, -2.71828183f,
            BitConverter.Int32BitsToSingle(0x7fc00001), BitConverter.Int32BitsToSingle(0x7f800001), BitConverter.Int32BitsToSingle(0x7f7fffff),
        };
        // Ties at bf16's rounding bit (bit 15) with even and odd kept LSB, and just around them.
        foreach (int bits in new[] { 0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, 0x3f7f8000, 0x00008000, 0x00018000, 0x7f7f8000 })
        {
            values.Add(BitConverter.Int32BitsToSingle(bits));
        }
        // Ties at f16's rounding bit (bit 12 of the fp32 mantissa), normal and subnormal.
        foreach (int bits in new[] { 0x3f801000, 0x3f803000, 0x3f801001, 0x3f800fff, 0x33800000, 0x33c00000, 0x34200000, 0x38801000 })
        {
            values.Add(BitConverter.Int32BitsToSingle(bits));
        }
        var random = new Random(7);
        for (int i = 0; i < 2000; i++)
        {
            values.Add(BitConverter.Int32BitsToSingle(random.Next() ^ (random.Next(2) << 31)));
        }
        return [.. values];
    }

    [Test]
    public void float_to_bf16_and_f16_match_csharp_on_edge_values()
    {
        float[] x = EdgeValues();
        int n = x.Length;
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var dbf16 = DeviceBuffer.Of<ushort>(_device, n);
        using var df16 = DeviceBuffer.Of<ushort>(_device, n);
        _device.Run(_module, "narrow", new Dim3((n + 255) / 256), new Dim3(256), 0, dx, dbf16, df16, n);
        ushort[] bf16 = dbf16.Read<ushort>(n), f16 = df16.Read<ushort>(n);
        for (int i = 0; i < n; i++)
        {
            string value = $"{x[i]:R} (0x{BitConverter.SingleToUInt32Bits(x[i]):x8})";
            Assert.That(bf16[i], Is.EqualTo(BFloat16.FromSingle(x[i])), $"float_to_bf16({value})");
            ushort expected = BitConverter.HalfToUInt16Bits((Half)x[i]);
            if (float.IsNaN(x[i]))
            {
                // Any quiet NaN of the same sign: CUDA's cvt.rn.f16.f32 gives the canonical 0x7e00 (sign kept).
                Assert.That(f16[i] & 0x7e00, Is.EqualTo(0x7e00), $"float_to_f16({value}) is a quiet NaN");
                Assert.That(f16[i] & 0x8000, Is.EqualTo(expected & 0x8000), $"float_to_f16({value}) keeps the sign");
            }
            else
            {
                Assert.That(f16[i], Is.EqualTo(expected), $"float_to_f16({value})");
            }
        }
    }

    [Test]
    public void bf16_and_f16_to_float_match_csharp_for_all_65536_patterns()
    {
        ushort[] bits = Enumerable.Range(0, 65536).Select(i => (ushort)i).ToArray();
        using var dbits = DeviceBuffer.From<ushort>(_device, bits);
        using var dbf16 = DeviceBuffer.Of<float>(_device, bits.Length);
        using var df16 = DeviceBuffer.Of<float>(_device, bits.Length);
        _device.Run(_module, "widen", new Dim3(bits.Length / 256), new Dim3(256), 0, dbits, dbf16, df16, bits.Length);
        float[] fromBf16 = dbf16.Read<float>(bits.Length), fromF16 = df16.Read<float>(bits.Length);
        for (int i = 0; i < bits.Length; i++)
        {
            Assert.That(BitConverter.SingleToUInt32Bits(fromBf16[i]), Is.EqualTo(BitConverter.SingleToUInt32Bits(BFloat16.ToSingle(bits[i]))),
                $"bf16_to_float(0x{i:x4})");
            float expected = (float)BitConverter.UInt16BitsToHalf(bits[i]);
            if (float.IsNaN(expected))
            {
                // NaN of the same sign; the payload's quiet bit may differ (common.cuh's CPU path keeps a
                // signalling f16 NaN signalling, .NET quiets it), which no kernel may depend on.
                Assert.That(float.IsNaN(fromF16[i]) && float.IsNegative(fromF16[i]) == float.IsNegative(expected), Is.True,
                    $"f16_to_float(0x{i:x4}) = {fromF16[i]} is a NaN of the same sign");
                continue;
            }
            Assert.That(BitConverter.SingleToUInt32Bits(fromF16[i]), Is.EqualTo(BitConverter.SingleToUInt32Bits(expected)),
                $"f16_to_float(0x{i:x4})");
        }
    }

    [Test]
    public void block_of_1024_threads_with_block_reduce_and_counting_barriers()
    {
        float[] x = Random(8, 1024);
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var dout = DeviceBuffer.Of<float>(_device, 1);
        using var counts = DeviceBuffer.Of<int>(_device, 3);
        _device.Run(_module, "big_block", new Dim3(1), new Dim3(1024), 0, dx, dout, counts);
        double sum = x.Sum(v => (double)v);
        Assert.That(dout.Read<float>(1)[0], Is.EqualTo(sum).Within(1024 * Math.Pow(2, -24) * x.Sum(v => Math.Abs((double)v))));
        Assert.That(counts.Read<int>(3), Is.EqualTo(new[] { x.Count(v => v > 0), 1, x.Any(v => v > 0.999f) ? 1 : 0 }));
    }

    [Test]
    public void barriers_in_a_block_with_a_partial_warp()
    {
        float[] x = Enumerable.Range(0, 100).Select(i => (float)i).ToArray();
        using var dx = DeviceBuffer.From<float>(_device, x);
        using var dout = DeviceBuffer.Of<float>(_device, 1);
        _device.Run(_module, "odd_block_sum", new Dim3(1), new Dim3(100), 0, dx, dout);
        Assert.That(dout.Read<float>(1)[0], Is.EqualTo(4950f));
    }

    [Test]
    public void sub_warp_widths_partial_masks_and_match_any()
    {
        int[] x = Enumerable.Range(0, 32).Select(i => (i * 37 + 11) % 50).ToArray();
        using var dx = DeviceBuffer.From<int>(_device, x);
        using var dout = DeviceBuffer.Of<int>(_device, 32 * 6);
        _device.Run(_module, "sub_warp", new Dim3(1), new Dim3(32), 0, dx, dout);
        int[] got = dout.Read<int>(32 * 6);
        for (int lane = 0; lane < 32; lane++)
        {
            int down = lane + 3 < (lane & ~7) + 8 ? x[lane + 3] : x[lane];
            int up = lane - 2 >= (lane & ~15) ? x[lane - 2] : x[lane];
            int half = x.Skip(lane < 16 ? 0 : 16).Take(16).Sum();
            uint same = 0;
            for (int other = 0; other < 32; other++)
            {
                same |= x[other] % 3 == x[lane] % 3 ? 1u << other : 0;
            }
            var expected = new[] { x[(lane & ~7) + 2], down, up, x[lane ^ 5], half, (int)same };
            Assert.That(got.AsSpan(lane * 6, 6).ToArray(), Is.EqualTo(expected), $"lane {lane}");
        }
    }

    [Test]
    public void uninitialized_shared_and_device_memory_read_as_nan()
    {
        using var dy = DeviceBuffer.Of<float>(_device, 32);
        float[] before = dy.Read<float>(32);
        Assert.That(before, Has.All.NaN, "fresh allocations hold 0xff bytes");
        _device.Run(_module, "uninitialized_shared", new Dim3(1), new Dim3(32), 0, dy);
        Assert.That(dy.Read<float>(32), Has.All.NaN, "shared memory starts as 0xff bytes in every block");
    }
}
