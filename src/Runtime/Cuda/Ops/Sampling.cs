using KernelLM.Runtime.Sampling;

namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    private const int SampleThreads = 1024;
    private const int PenaltyThreads = 256;

    /// <summary>
    /// output[r] = the token chosen from logits row r ([rows, vocabulary] F32/BF16, unchanged) with
    /// <paramref name="options"/> (temperature, top-k, top-p, min-p; the repetition penalty is
    /// <see cref="RepetitionPenalty"/>, applied first). The draw: <paramref name="uniforms"/> [rows] F64 in
    /// [0, 1) when given, else splitmix64(seed, counters[r]) with <paramref name="counters"/> [rows] U64
    /// advanced by the kernel (graph replay draws a new number each step). output: [rows] I32.
    /// </summary>
    public static void Sample(CudaDevice device, DeviceTensor logits, int vocabulary, SamplingOptions options, DeviceTensor output,
        DeviceTensor? uniforms, DeviceTensor? counters, ulong seed = 0, nint stream = 0)
    {
        const string op = "sample";
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        RequireDType(logits, op, DType.F32, DType.BF16);
        RequireDType(output, op, DType.I32);
        if (vocabulary <= 0 || logits.ElementCount % vocabulary != 0)
        {
            throw new ArgumentException($"{op}: tensor '{logits.Name}' {logits.ShapeText} is not a whole number of rows of {vocabulary}");
        }
        int rows = checked((int)(logits.ElementCount / vocabulary));
        RequireElements(output, rows, op, $"[{rows}]");
        if (uniforms is not null)
        {
            RequireDType(uniforms, op, DType.F64);
            RequireElements(uniforms, rows, op, $"[{rows}]");
        }
        else if (!options.IsGreedy)
        {
            if (counters is null)
            {
                throw new ArgumentException($"{op}: sampling needs either uniforms [{rows}] F64 or counters [{rows}] U64");
            }
            RequireDType(counters, op, DType.U64);
            RequireElements(counters, rows, op, $"[{rows}]");
        }
        if (rows == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(logits.Address);
        arguments.Add(vocabulary);
        arguments.Add(options.Temperature);
        arguments.Add(options.TopK);
        arguments.Add(options.TopP);
        arguments.Add(options.MinP);
        arguments.Add(uniforms?.Address ?? 0UL);
        arguments.Add(seed);
        arguments.Add(counters?.Address ?? 0UL);
        arguments.Add(output.Address);
        device.Backend.Launch(device.Function(KernelName("sample", Suffix(logits.DType))), new Dim3(rows), new Dim3(SampleThreads), 0, stream, arguments.Pointers);
    }

    /// <summary>
    /// The repetition penalty in place on logits [rows, vocabulary] (F32/BF16): once per distinct id in
    /// history[r, 0 .. historyLength[r]) ([rows, maxHistory] I32, lengths [rows] I32 read on the device).
    /// flags: [rows, vocabulary] I32 scratch that must be zero, and is zero again afterwards.
    /// </summary>
    public static void RepetitionPenalty(CudaDevice device, DeviceTensor logits, int vocabulary, DeviceTensor history, DeviceTensor historyLength,
        float penalty, DeviceTensor flags, nint stream = 0)
    {
        const string op = "repetition_penalty";
        RequireDType(logits, op, DType.F32, DType.BF16);
        RequireDType(history, op, DType.I32);
        RequireDType(historyLength, op, DType.I32);
        RequireDType(flags, op, DType.I32);
        if (!(penalty > 0) || !float.IsFinite(penalty))
        {
            throw new ArgumentOutOfRangeException(nameof(penalty), penalty, $"{op}: the penalty must be a positive finite number");
        }
        if (vocabulary <= 0 || logits.ElementCount % vocabulary != 0)
        {
            throw new ArgumentException($"{op}: tensor '{logits.Name}' {logits.ShapeText} is not a whole number of rows of {vocabulary}");
        }
        int rows = checked((int)(logits.ElementCount / vocabulary));
        RequireElements(historyLength, rows, op, $"[{rows}]");
        RequireElements(flags, logits.ElementCount, op, $"{logits.ShapeText}");
        if (rows == 0 || history.ElementCount % rows != 0)
        {
            throw new ArgumentException($"{op}: tensor '{history.Name}' {history.ShapeText} is not [{rows}, max_history]");
        }
        int maxHistory = checked((int)(history.ElementCount / rows));
        if (maxHistory == 0)
        {
            return;
        }
        var grid = new Dim3(Blocks(maxHistory, PenaltyThreads), rows);
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(logits.Address);
        arguments.Add(vocabulary);
        arguments.Add(history.Address);
        arguments.Add(maxHistory);
        arguments.Add(historyLength.Address);
        arguments.Add(penalty);
        arguments.Add(flags.Address);
        device.Backend.Launch(device.Function(KernelName("repetition_penalty", Suffix(logits.DType))), grid, new Dim3(PenaltyThreads), 0, stream, arguments.Pointers);

        Span<byte> clearValues = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> clearPointers = stackalloc nint[KernelArguments.MaxArguments];
        var clear = new KernelArguments(clearValues, clearPointers);
        clear.Add(vocabulary);
        clear.Add(history.Address);
        clear.Add(maxHistory);
        clear.Add(historyLength.Address);
        clear.Add(flags.Address);
        device.Backend.Launch(device.Function("repetition_penalty_clear"), grid, new Dim3(PenaltyThreads), 0, stream, clear.Pointers);
    }
}
