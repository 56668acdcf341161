namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>x[i] = scale * u(seed, i), u uniform in [-1, 1) (counter-based: reproducible). x: F32/BF16/F16.</summary>
    public static void FillUniform(CudaDevice device, DeviceTensor x, ulong seed, float scale, nint stream = 0)
    {
        RequireDType(x, "fill_uniform", DType.F32, DType.BF16, DType.F16);
        LaunchFill(device, KernelName("fill_uniform", Suffix(x.DType)), x.Address, x.ElementCount, seed, scale, constant: false, stream);
    }

    /// <summary>x[i] = value. x: F32.</summary>
    public static void FillConstant(CudaDevice device, DeviceTensor x, float value, nint stream = 0)
    {
        RequireDType(x, "fill_constant", DType.F32);
        LaunchFill(device, "fill_constant_f32", x.Address, x.ElementCount, 0, value, constant: true, stream);
    }

    private static void LaunchFill(CudaDevice device, string kernel, ulong x, long count, ulong seed, float value, bool constant, nint stream)
    {
        if (count == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x);
        arguments.Add(count);
        if (!constant)
        {
            arguments.Add(seed);
        }
        arguments.Add(value);
        int blocks = (int)Math.Min(65535, (count + BlockSize - 1) / BlockSize);
        device.Backend.Launch(device.Function(kernel), new Dim3(blocks), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
