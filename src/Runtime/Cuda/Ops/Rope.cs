namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>RoPE (rotate-half) in place on x: [tokens, heads, head_dim] at positions start..;
    /// inverseFrequencies: [head_dim / 2] F32 (rope_scaling already applied).</summary>
    public static void Rope(CudaDevice device, DeviceTensor x, int heads, DeviceTensor inverseFrequencies, int start, nint stream = 0) =>
        Rope(device, x, heads, inverseFrequencies, null, start, stream);

    /// <summary>As <see cref="Rope(CudaDevice, DeviceTensor, int, DeviceTensor, int, nint)"/> at positions
    /// startAt[0] + start.., the first read from device memory when the kernel runs (so that a captured graph
    /// replays at the current position). startAt: [1] I32 or null.</summary>
    public static void Rope(CudaDevice device, DeviceTensor x, int heads, DeviceTensor inverseFrequencies, DeviceTensor? startAt, int start,
        nint stream = 0)
    {
        const string op = "rope";
        if (startAt is not null)
        {
            RequireDType(startAt, op, DType.I32);
            RequireElements(startAt, 1, op, $"[1]");
        }
        RequireDType(x, op, DType.F32, DType.BF16, DType.F16);
        RequireDType(inverseFrequencies, op, DType.F32);
        int headDim = checked((int)inverseFrequencies.ElementCount * 2);
        if (heads <= 0 || headDim == 0 || x.ElementCount % ((long)heads * headDim) != 0)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' {x.ShapeText} is not [tokens, {heads} heads, {headDim}] (head_dim from '{inverseFrequencies.Name}')");
        }
        if (headDim / 2 > 1024)
        {
            throw new ArgumentException($"{op}: head_dim {headDim} exceeds the kernel's 2048");
        }
        ArgumentOutOfRangeException.ThrowIfNegative(start);
        int tokens = checked((int)(x.ElementCount / ((long)heads * headDim)));
        LaunchRope(device, KernelName("rope", Suffix(x.DType)), x.Address, inverseFrequencies.Address, startAt?.Address ?? 0, tokens, heads, headDim, start,
            stream);
    }

    private static void LaunchRope(CudaDevice device, string kernel, ulong x, ulong inverseFrequencies, ulong startAt, int tokens, int heads, int headDim,
        int start, nint stream)
    {
        if (tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x);
        arguments.Add(inverseFrequencies);
        arguments.Add(startAt);
        arguments.Add(heads);
        arguments.Add(headDim);
        arguments.Add(start);
        int threads = (headDim / 2 + 31) / 32 * 32;
        device.Backend.Launch(device.Function(kernel), new Dim3(tokens, heads), new Dim3(threads), 0, stream, arguments.Pointers);
    }
}
