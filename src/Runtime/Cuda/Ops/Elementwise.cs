namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>Launchers of the one-thread-per-element kernels: silu_mul.cu, add.cu, convert.cu.</summary>
public static partial class CudaOps
{
    /// <summary>gate = silu(gate) * up, element-wise. gate, up: same dtype and element count.</summary>
    public static void SiluMultiply(CudaDevice device, DeviceTensor gate, DeviceTensor up, nint stream = 0)
    {
        const string op = "silu_mul";
        RequireDType(gate, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(gate, up, op);
        RequireElements(up, gate.ElementCount, op, $"{gate.ShapeText}");
        LaunchElementwise(device, KernelName("silu_mul", Suffix(gate.DType)), gate.Address, up.Address, gate.ElementCount, stream);
    }

    /// <summary>y += x, element-wise (the residual add). y, x: same dtype and element count.</summary>
    public static void Add(CudaDevice device, DeviceTensor y, DeviceTensor x, nint stream = 0)
    {
        const string op = "add";
        RequireDType(y, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(y, x, op);
        RequireElements(x, y.ElementCount, op, $"{y.ShapeText}");
        LaunchElementwise(device, KernelName("add", Suffix(y.DType)), y.Address, x.Address, y.ElementCount, stream);
    }

    /// <summary>y = x converted (bf16/f16 to f32, f32 to bf16/f16). Same element count.</summary>
    public static void Convert(CudaDevice device, DeviceTensor x, DeviceTensor y, nint stream = 0)
    {
        const string op = "convert";
        RequireDType(x, op, DType.F32, DType.BF16, DType.F16);
        RequireDType(y, op, DType.F32, DType.BF16, DType.F16);
        if ((x.DType == DType.F32) == (y.DType == DType.F32))
        {
            throw new ArgumentException($"{op}: '{x.Name}' {x.DType} -> '{y.Name}' {y.DType}: one side must be F32 and the other BF16 or F16");
        }
        RequireElements(y, x.ElementCount, op, $"{x.ShapeText}");
        LaunchElementwise(device, KernelName("convert", Suffix(x.DType), Underscored(y.DType)), x.Address, y.Address, x.ElementCount, stream);
    }

    private static void LaunchElementwise(CudaDevice device, string kernel, ulong first, ulong second, long count, nint stream)
    {
        if (count == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(first);
        arguments.Add(second);
        arguments.Add(count);
        device.Backend.Launch(device.Function(kernel), new Dim3(Blocks(count, BlockSize)), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
