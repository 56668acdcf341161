namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>output[r] = the lowest index of the largest value of row r. x: [rows, cols] F32/BF16; output: [rows] I32.</summary>
    public static void Argmax(CudaDevice device, DeviceTensor x, int cols, DeviceTensor output, nint stream = 0)
    {
        const string op = "argmax";
        RequireDType(x, op, DType.F32, DType.BF16);
        RequireDType(output, op, DType.I32);
        if (cols <= 0 || x.ElementCount % cols != 0)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' {x.ShapeText} is not a whole number of rows of {cols}");
        }
        int rows = checked((int)(x.ElementCount / cols));
        RequireElements(output, rows, op, $"[{rows}]");
        LaunchArgmax(device, KernelName("argmax", Suffix(x.DType)), x.Address, output.Address, rows, cols, stream);
    }

    private static void LaunchArgmax(CudaDevice device, string kernel, ulong x, ulong output, int rows, int cols, nint stream)
    {
        if (rows == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x);
        arguments.Add(output);
        arguments.Add(cols);
        device.Backend.Launch(device.Function(kernel), new Dim3(rows), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
