namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>y = x / sqrt(mean(x^2) + eps) * weight per row. x, y: [rows, cols] same dtype (may be the same
    /// tensor); weight: [cols] F32.</summary>
    public static void RmsNorm(CudaDevice device, DeviceTensor x, DeviceTensor weight, float epsilon, DeviceTensor y, nint stream = 0)
    {
        const string op = "rms_norm";
        RequireDType(x, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(x, y, op);
        RequireDType(weight, op, DType.F32);
        int cols = checked((int)weight.ElementCount);
        if (cols == 0 || x.ElementCount % cols != 0)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' {x.ShapeText} is not a whole number of rows of weight '{weight.Name}' {weight.ShapeText}");
        }
        RequireElements(y, x.ElementCount, op, $"{x.ShapeText}");
        if (!(epsilon > 0))
        {
            throw new ArgumentException($"{op}: epsilon must be positive, got {epsilon}");
        }
        LaunchRmsNorm(device, KernelName("rms_norm", Suffix(x.DType)), x.Address, weight.Address, y.Address, checked((int)(x.ElementCount / cols)), cols, epsilon, stream);
    }

    private static void LaunchRmsNorm(CudaDevice device, string kernel, ulong x, ulong weight, ulong y, int rows, int cols, float epsilon, nint stream)
    {
        if (rows == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x);
        arguments.Add(weight);
        arguments.Add(y);
        arguments.Add(cols);
        arguments.Add(epsilon);
        // One block per row; 256 threads stride the row (a multiple of 32 for the warp reduction).
        device.Backend.Launch(device.Function(kernel), new Dim3(rows), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
