using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Conformance;

public sealed partial class KernelConformanceTests
{
    // ------------------------------------------------------------------ logit_sum

    /// <summary>
    /// The shapes of the logit composition: one row of the embedded model's 2048 and of Llama 3's 128256 logits; several
    /// rows of odd width whose members have padding rows past it (strides 1111 / 1120 / 1113); six members (two launches,
    /// the second accumulating); the plausibility cut of contrastive decoding (alpha 0.1 and 0.5; once with member 0 padded past the width). Weights include
    /// negative ones (an amateur, an unconditional sequence).
    /// </summary>
    public static IEnumerable<TestCaseData> LogitSumCases() => Cases("logit_sum", device =>
    {
        var cases = new List<object[]>();
        foreach (var dtype in device.Activations.Where(d => d != DType.F16))
        {
            cases.Add([dtype, P("rows", 1), P("width", 2048), "strides=2048,2048", "weights=1,1", "alpha=0"]);
            cases.Add([dtype, P("rows", 1), P("width", 128256), "strides=128256,128256", "weights=1.5,-0.5", "alpha=0"]);
            cases.Add([dtype, P("rows", 3), P("width", 1111), "strides=1111,1120,1113", "weights=1,0.7,-1.3", "alpha=0"]);
            cases.Add([dtype, P("rows", 2), P("width", 1000), "strides=1000,1000,1000,1000,1000,1003", "weights=1,0.5,-0.25,2,-1,0.125", "alpha=0"]);
            cases.Add([dtype, P("rows", 3), P("width", 1001), "strides=1001,1001", "weights=1,-1", "alpha=0.1"]);
            cases.Add([dtype, P("rows", 1), P("width", 32000), "strides=32000,32064", "weights=1,-1", "alpha=0.5"]);
            cases.Add([dtype, P("rows", 2), P("width", 1001), "strides=1010,1001,1003", "weights=1,-1,0.5", "alpha=0.1"]);
        }
        return cases;
    });

    [TestCaseSource(nameof(LogitSumCases))]
    public void logit_sum(string deviceName, DType dtype, int rows, int width, string strideText, string weightText, string alphaText)
    {
        var device = ConformanceDevices.Get(deviceName);
        int[] strides = strideText["strides=".Length..].Split(',').Select(int.Parse).ToArray();
        float[] weights = weightText["weights=".Length..].Split(',').Select(w => float.Parse(w, System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        float alpha = float.Parse(alphaText["alpha=".Length..], System.Globalization.CultureInfo.InvariantCulture);
        var inputs = strides.Select((stride, m) => OpBackend.Representable(dtype, LogitRows(rows, stride, 1000 * m + width))).ToArray();

        float[] actual = device is CudaOpBackend cuda ? LogitSumOnDevice(cuda.Device, dtype, inputs, strides, weights, rows, width, alpha) : LogitSumTwin(inputs, strides, weights, rows, width, alpha);

        // The twin is the kernel's arithmetic (one fma per member, in order): the device must equal it bit for bit.
        var twin = LogitSumTwin(inputs, strides, weights, rows, width, alpha);
        float shift = alpha > 0 ? MathF.Log(alpha) : 0;
        int cut = 0;
        for (int r = 0; r < rows; r++)
        {
            float cutoff = alpha > 0 ? inputs[0].AsSpan(r * strides[0], width).ToArray().Max() + shift : float.NegativeInfinity;
            for (int i = 0; i < width; i++)
            {
                // fp64 reference: sum_m w_m x_m; each fma rounds once relative to a partial sum bounded by sum |w_m x_m|.
                double sum = 0, magnitude = 0;
                for (int m = 0; m < inputs.Length; m++)
                {
                    double term = (double)weights[m] * inputs[m][r * strides[m] + i];
                    sum += term;
                    magnitude += Math.Abs(term);
                }
                float value = actual[r * width + i];
                string where = $"row {r}, entry {i}";
                if (inputs[0][r * strides[0] + i] < cutoff)
                {
                    Assert.That(value, Is.EqualTo(float.NegativeInfinity), $"{where}: outside the plausible set");
                    cut++;
                    continue;
                }
                Assert.That(value, Is.EqualTo(sum).Within(inputs.Length * Tolerances.UnitRoundoff * magnitude), where);
                Assert.That(BitConverter.SingleToInt32Bits(value), Is.EqualTo(BitConverter.SingleToInt32Bits(twin[r * width + i])), $"{where}: device {value} twin {twin[r * width + i]}");
            }
        }
        if (alpha > 0)
        {
            Assert.That(cut, Is.InRange(1, rows * width - rows), "the cut removes some entries and keeps at least each row's best");
        }
    }

    /// <summary>Rows spread like logits, [-8, 8), with a few strong candidates so that a plausibility cut keeps a handful.</summary>
    private static float[] LogitRows(int rows, int stride, int seed)
    {
        var random = new Random(seed);
        var values = new float[rows * stride];
        for (int i = 0; i < values.Length; i++)
        {
            values[i] = (float)(random.NextDouble() * 16 - 8);
        }
        for (int r = 0; r < rows; r++)
        {
            for (int k = 0; k < 4; k++)
            {
                values[r * stride + random.Next(stride)] = (float)(9 + random.NextDouble());
            }
        }
        return values;
    }

    private static float[] LogitSumTwin(float[][] inputs, int[] strides, float[] weights, int rows, int width, float alpha)
    {
        var output = new float[rows * width];
        for (int m = 0; m < inputs.Length; m++)
        {
            LogitSum.Accumulate(inputs[m], strides[m], weights[m], output, rows, width, first: m == 0);
        }
        if (alpha > 0)
        {
            for (int r = 0; r < rows; r++)
            {
                var plausibility = inputs[0].AsSpan(r * strides[0], width);
                LogitSum.Cut(plausibility, LogitSum.RowCutoff(plausibility, MathF.Log(alpha)), output.AsSpan(r * width, width));
            }
        }
        return output;
    }

    /// <summary>The op on a CUDA device, its output followed by a guard region that must come back untouched.</summary>
    private static float[] LogitSumOnDevice(CudaDevice device, DType dtype, float[][] inputs, int[] strides, float[] weights, int rows, int width, float alpha)
    {
        var tensors = new List<DeviceTensor>();
        try
        {
            var members = new LogitSumInput[inputs.Length];
            for (int m = 0; m < inputs.Length; m++)
            {
                var tensor = device.Allocate($"x{m}", dtype, rows, strides[m]);
                tensors.Add(tensor);
                tensor.Upload<byte>(OpBackend.Encode(dtype, inputs[m]));
                members[m] = new LogitSumInput(tensor, strides[m], weights[m]);
            }
            int count = rows * width;
            var buffer = device.Allocate("out_buffer", DType.F32, count + OpBackend.GuardElements);
            tensors.Add(buffer);
            var guarded = new float[count + OpBackend.GuardElements];
            guarded.AsSpan().Fill(-7.77e7f);
            buffer.Upload<float>(guarded);
            var output = buffer.View("out", DType.F32, 0, rows, width);
            DeviceTensor? cutoffs = null;
            if (alpha > 0)
            {
                cutoffs = device.Allocate("cutoffs", DType.F32, rows);
                tensors.Add(cutoffs);
                CudaOps.LogitRowMax(device, members[0].Logits, strides[0], width, MathF.Log(alpha), cutoffs);
            }
            CudaOps.LogitSum(device, members, width, cutoffs, output);
            var values = buffer.Download<float>();
            for (int i = count; i < values.Length; i++)
            {
                Assert.That(values[i], Is.EqualTo(-7.77e7f), $"logit_sum wrote past the end of 'out' ({count} elements) at element {i}");
            }
            return values[..count];
        }
        finally
        {
            tensors.ForEach(t => t.Dispose());
        }
    }
}
