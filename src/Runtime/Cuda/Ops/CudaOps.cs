namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>
/// Op entries of the CUDA device: each validates dtypes and shapes (naming the tensor) and calls its launcher
/// (in the file named after the kernel), which only does grid / block maths and enqueues the kernel. Nothing
/// here synchronises. Model code calls only these entries.
/// </summary>
public static partial class CudaOps
{
    internal const int BlockSize = 256;

    private static string Suffix(DType dtype) => dtype switch
    {
        DType.F32 => "f32",
        DType.BF16 => "bf16",
        DType.F16 => "f16",
        _ => throw new ArgumentException($"dtype {dtype} has no kernels"),
    };

    private static void RequireDType(DeviceTensor tensor, string op, params DType[] allowed)
    {
        if (Array.IndexOf(allowed, tensor.DType) < 0)
        {
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' is {tensor.DType}; expected {string.Join(" or ", allowed)}");
        }
    }

    private static void RequireSameDType(DeviceTensor a, DeviceTensor b, string op)
    {
        if (a.DType != b.DType)
        {
            throw new ArgumentException($"{op}: tensors '{a.Name}' ({a.DType}) and '{b.Name}' ({b.DType}) must have the same dtype");
        }
    }

    private static void RequireElements(DeviceTensor tensor, long elements, string op, string expected)
    {
        if (tensor.ElementCount != elements)
        {
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' has shape {tensor.ShapeText} ({tensor.ElementCount} elements); expected {expected}");
        }
    }

    private static int Blocks(long items, int blockSize) => checked((int)((items + blockSize - 1) / blockSize));
}
