namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>One member of a <see cref="CudaOps.LogitSum"/>: its logits [rows, <paramref name="Stride"/>] (F32/BF16), of which
/// the first width columns are summed with <paramref name="Weight"/>.</summary>
public readonly record struct LogitSumInput(DeviceTensor Logits, int Stride, float Weight);

public static partial class CudaOps
{
    /// <summary>Members per logit_sum launch (LOGIT_SUM_MAX_INPUTS in kernels/logit_sum.cu).</summary>
    internal const int LogitSumMaxInputs = Composition.LogitSum.MaxInputsPerLaunch;

    /// <summary>
    /// The weighted sum of the members' logits (device twin of <see cref="Composition.LogitSum"/>; kernels/logit_sum.cu):
    /// output[r, i] = sum_m w_m x_m[r, i] for i &lt; <paramref name="width"/>, fp32, in member order. Sources:
    /// <paramref name="inputs"/> (one or more, all F32 or all BF16, each [rows, stride] with stride &gt;= width);
    /// <paramref name="cutoff"/> [rows] F32 or null: where given, entries whose first member's logit is below cutoff[r]
    /// become -inf (the plausibility cut, see <see cref="LogitRowMax"/>). Destination: <paramref name="output"/> [rows, width]
    /// F32. Enqueues one launch per <see cref="LogitSumMaxInputs"/> members; never synchronises.
    /// </summary>
    public static void LogitSum(CudaDevice device, ReadOnlySpan<LogitSumInput> inputs, int width, DeviceTensor? cutoff, DeviceTensor output, nint stream = 0)
    {
        const string op = "logit_sum";
        if (inputs.IsEmpty)
        {
            throw new ArgumentException($"{op}: needs at least one input");
        }
        RequireDType(output, op, DType.F32);
        if (width <= 0 || output.ElementCount % width != 0)
        {
            throw new ArgumentException($"{op}: tensor '{output.Name}' {output.ShapeText} is not a whole number of rows of {width}");
        }
        int rows = checked((int)(output.ElementCount / width));
        var dtype = inputs[0].Logits.DType;
        foreach (var input in inputs)
        {
            RequireDType(input.Logits, op, DType.F32, DType.BF16);
            RequireSameDType(inputs[0].Logits, input.Logits, op);
            if (input.Stride < width)
            {
                throw new ArgumentException($"{op}: tensor '{input.Logits.Name}' has rows of {input.Stride}, fewer than the width {width}");
            }
            RequireElements(input.Logits, (long)rows * input.Stride, op, $"[{rows}, {input.Stride}]");
            if (!float.IsFinite(input.Weight))
            {
                throw new ArgumentException($"{op}: tensor '{input.Logits.Name}' has weight {input.Weight}; weights must be finite");
            }
        }
        if (cutoff is not null)
        {
            RequireDType(cutoff, op, DType.F32);
            RequireElements(cutoff, rows, op, $"[{rows}]");
        }
        if (rows == 0)
        {
            return;
        }
        string kernel = KernelName("logit_sum", Suffix(dtype));
        for (int first = 0; first < inputs.Length; first += LogitSumMaxInputs)
        {
            var group = inputs.Slice(first, Math.Min(LogitSumMaxInputs, inputs.Length - first));
            // The cut reads the first member of the first launch; later launches only accumulate.
            LaunchLogitSum(device, kernel, group, width, rows, accumulate: first > 0, first == 0 ? cutoff?.Address ?? 0 : 0, output.Address, stream);
        }
    }

    private static void LaunchLogitSum(CudaDevice device, string kernel, ReadOnlySpan<LogitSumInput> group, int width, int rows, bool accumulate,
        ulong cutoff, ulong output, nint stream)
    {
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        for (int m = 0; m < LogitSumMaxInputs; m++)
        {
            arguments.Add(m < group.Length ? group[m].Logits.Address : 0UL);
        }
        for (int m = 0; m < LogitSumMaxInputs; m++)
        {
            arguments.Add(m < group.Length ? group[m].Weight : 0f);
        }
        for (int m = 0; m < LogitSumMaxInputs; m++)
        {
            arguments.Add(m < group.Length ? (long)group[m].Stride : 0L);
        }
        arguments.Add(group.Length);
        arguments.Add(width);
        arguments.Add(accumulate ? 1 : 0);
        arguments.Add(cutoff);
        arguments.Add(output);
        device.Backend.Launch(device.Function(kernel), new Dim3(Blocks(width, BlockSize), rows), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }

    /// <summary>
    /// cutoff[r] = max_{i &lt; width} x[r, i] + <paramref name="shift"/> (kernels/logit_sum.cu): with shift = log(alpha), the
    /// <see cref="LogitSum"/> cut keeps {i : p(i) &gt;= alpha max p}. x: [rows, stride] F32/BF16; cutoff: [rows] F32.
    /// </summary>
    public static void LogitRowMax(CudaDevice device, DeviceTensor x, int stride, int width, float shift, DeviceTensor cutoff, nint stream = 0)
    {
        const string op = "logit_row_max";
        RequireDType(x, op, DType.F32, DType.BF16);
        RequireDType(cutoff, op, DType.F32);
        if (width <= 0 || stride < width || x.ElementCount % stride != 0)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' {x.ShapeText} is not a whole number of rows of {stride} >= width {width}");
        }
        if (!float.IsFinite(shift))
        {
            throw new ArgumentOutOfRangeException(nameof(shift), shift, $"{op}: the shift must be finite");
        }
        int rows = checked((int)(x.ElementCount / stride));
        RequireElements(cutoff, rows, op, $"[{rows}]");
        if (rows == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x.Address);
        arguments.Add((long)stride);
        arguments.Add(width);
        arguments.Add(shift);
        arguments.Add(cutoff.Address);
        device.Backend.Launch(device.Function(KernelName("logit_row_max", Suffix(x.DType))), new Dim3(rows), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
