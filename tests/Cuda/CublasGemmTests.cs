using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Tests.Cuda;

/// <summary>
/// The prefill GEMM through cuBLAS (<see cref="CudaOps.CublasGemm"/>) and its bias kernel. On a GPU: against an fp64
/// product with every combination of bias and residual (aliased or not). On the emulated device, which has no cuBLAS:
/// the op refuses clearly, <see cref="CudaOps.Linear"/> takes the built-in GEMM, and add_bias is checked on its own.
/// </summary>
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class CublasGemmTests(string deviceName)
{
    private CudaDevice _device = null!;

    [OneTimeSetUp]
    public void CreateDevice()
    {
        if (deviceName == "cuda")
        {
            CudaTestSupport.RequireDevice();
        }
        _device = new CudaDevice(deviceName == "cuda" ? new DriverBackend() : new EmulatorBackend(), [KernelSources.Get("add.cu")]);
    }

    [OneTimeTearDown]
    public void DisposeDevice() => _device?.Dispose();

    private static float[] Values(int count, int seed, float scale)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)(random.NextDouble() * 2 - 1) * scale).ToArray();
    }

    [Test]
    public void Add_bias_adds_the_row_bias_to_every_token()
    {
        const int rows = 300, tokens = 5;
        var y = Values(rows * tokens, 1, 2);
        var bias = Values(rows, 2, 1);
        using var yTensor = _device.Allocate("y", DType.F32, tokens, rows);
        using var biasTensor = _device.Allocate("bias", DType.F32, rows);
        yTensor.Upload<float>(y);
        biasTensor.Upload<float>(bias);
        CudaOps.AddBias(_device, yTensor, biasTensor);
        var actual = yTensor.Download<float>();
        for (int i = 0; i < y.Length; i++)
        {
            Assert.That(actual[i], Is.EqualTo(y[i] + bias[i % rows]), $"element {i}");
        }
        using var wrong = _device.Allocate("wrong", DType.F32, 7);
        Assert.That(() => CudaOps.AddBias(_device, wrong, biasTensor), Throws.ArgumentException.With.Message.Contain("'wrong'"));
    }

    [Test]
    public void Without_cublas_the_op_refuses_and_linear_takes_the_built_in_gemm()
    {
        if (deviceName == "cuda")
        {
            Assert.Ignore("a GPU backend: see the cuBLAS product test");
        }
        using var weight = _device.Allocate("w", DType.F32, 4, 4);
        using var x = _device.Allocate("x", DType.F32, 16, 4);
        using var y = _device.Allocate("y", DType.F32, 16, 4);
        Assert.That(() => CudaOps.CublasGemm(_device, weight, x, y), Throws.TypeOf<CudaException>().With.Message.Contain("built-in GEMM"));
        Assert.That(CudaOps.PrefillGemmEngine(_device), Does.Contain("no cuBLAS"));
    }

    public static IEnumerable<TestCaseData> Products()
    {
        foreach (var dtype in new[] { DType.F32, DType.BF16, DType.F16 })
        {
            foreach (var (bias, residual) in new[] { (false, 0), (true, 0), (false, 1), (true, 1), (true, 2) })
            {
                yield return new TestCaseData(dtype, bias, residual).SetName($"cublas_gemm({dtype}, bias={bias}, residual={residual switch { 0 => "none", 1 => "y", _ => "other" }})");
            }
        }
    }

    /// <summary>residual: 0 none, 1 y itself (the accumulate path, beta = 1), 2 another tensor (copied into y first).</summary>
    [TestCaseSource(nameof(Products))]
    public void Cublas_product_matches_an_fp64_product(DType dtype, bool bias, int residual)
    {
        if (_device.Backend is not ICublasBackend { HasCublas: true })
        {
            Assert.Ignore($"no cuBLAS on this device: {CudaOps.PrefillGemmEngine(_device)}");
        }
        const int rows = 200, cols = 96, tokens = 37;
        var weight = Representable(dtype, Values(rows * cols, 3, 1));
        var x = Representable(dtype, Values(tokens * cols, 4, 1));
        var biasValues = Values(rows, 5, 0.5f);
        var residualValues = Representable(dtype, Values(tokens * rows, 6, 1));
        using var w = Upload("w", dtype, weight, rows, cols);
        using var input = Upload("x", dtype, x, tokens, cols);
        using var y = residual == 1 ? Upload("y", dtype, residualValues, tokens, rows) : _device.Allocate("y", dtype, tokens, rows);
        using var other = residual == 2 ? Upload("r", dtype, residualValues, tokens, rows) : null;
        using var biasTensor = bias ? Upload("bias", DType.F32, biasValues, rows) : null;
        CudaOps.CublasGemm(_device, w, input, y, biasTensor, residual switch { 0 => null, 1 => y, _ => other });
        var actual = Download(y);
        double unit = dtype switch { DType.F32 => 1.0 / (1 << 24), DType.F16 => 1.0 / 2048, _ => 1.0 / 256 };
        for (int t = 0; t < tokens; t++)
        {
            for (int r = 0; r < rows; r++)
            {
                double sum = 0, magnitude = 0;
                for (int c = 0; c < cols; c++)
                {
                    sum += (double)x[t * cols + c] * weight[r * cols + c];
                    magnitude += Math.Abs((double)x[t * cols + c] * weight[r * cols + c]);
                }
                if (bias)
                {
                    sum += biasValues[r];
                }
                if (residual != 0)
                {
                    sum += residualValues[t * rows + r];
                }
                // fp32 accumulation over cols terms plus the output's rounding (and the bias pass's, after a rounded product).
                double tolerance = (cols + 2) * (1.0 / (1 << 24)) * (magnitude + 1) + 2 * unit * (Math.Abs(sum) + 1);
                Assert.That(actual[t * rows + r], Is.EqualTo(sum).Within(tolerance), $"y[{t}, {r}]");
            }
        }
    }

    private static float[] Representable(DType dtype, float[] values) => dtype switch
    {
        DType.BF16 => values.Select(v => BFloat16.ToSingle(BFloat16.FromSingle(v))).ToArray(),
        DType.F16 => values.Select(v => (float)(Half)v).ToArray(),
        _ => values,
    };

    private DeviceTensor Upload(string name, DType dtype, float[] values, params int[] shape)
    {
        var tensor = _device.Allocate(name, dtype, shape);
        switch (dtype)
        {
            case DType.BF16:
                tensor.Upload<ushort>(values.Select(BFloat16.FromSingle).ToArray());
                break;
            case DType.F16:
                tensor.Upload<Half>(values.Select(v => (Half)v).ToArray());
                break;
            default:
                tensor.Upload<float>(values);
                break;
        }
        return tensor;
    }

    private static float[] Download(DeviceTensor tensor) => tensor.DType switch
    {
        DType.BF16 => tensor.Download<ushort>().Select(BFloat16.ToSingle).ToArray(),
        DType.F16 => tensor.Download<Half>().Select(v => (float)v).ToArray(),
        _ => tensor.Download<float>(),
    };
}
