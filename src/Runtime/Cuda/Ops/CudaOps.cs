using System.Runtime.CompilerServices;

namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>
/// Op entries of the CUDA device: each validates dtypes and shapes (naming the tensor) and calls its launcher
/// (in the file named after the kernel), which only does grid / block maths and enqueues the kernel. Nothing
/// here synchronises. Model code calls only these entries.
/// </summary>
public static partial class CudaOps
{
    internal const int BlockSize = 256;

    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(string Stem, string Suffix, string Variant), string> s_kernelNames = new();

    /// <summary>"{stem}_{suffix}{variant}", built once per name: launches in the decode loop allocate nothing.</summary>
    private static string KernelName(string stem, string suffix, string variant = "") =>
        s_kernelNames.TryGetValue((stem, suffix, variant), out string? name) ? name : s_kernelNames.GetOrAdd((stem, suffix, variant), $"{stem}_{suffix}{variant}");

    /// <summary>"_f32" / "_bf16" / "_f16": the second dtype of a two-dtype kernel name, without building a string.</summary>
    private static string Underscored(DType dtype) => dtype switch
    {
        DType.F32 => "_f32",
        DType.BF16 => "_bf16",
        DType.F16 => "_f16",
        _ => throw new ArgumentException($"dtype {dtype} has no kernels"),
    };

    private static string Suffix(DType dtype) => dtype switch
    {
        DType.F32 => "f32",
        DType.BF16 => "bf16",
        DType.F16 => "f16",
        _ => throw new ArgumentException($"dtype {dtype} has no kernels"),
    };

    // The checks run on every launch, in the decode loop too: they allocate nothing unless they fail (params spans;
    // the expected-shape text is an interpolated string formatted only when the check fails).
    private static void RequireDType(DeviceTensor tensor, string op, params ReadOnlySpan<DType> allowed)
    {
        if (allowed.IndexOf(tensor.DType) < 0)
        {
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' is {tensor.DType}; expected {string.Join(" or ", allowed.ToArray())}");
        }
    }

    private static void RequireSameDType(DeviceTensor a, DeviceTensor b, string op)
    {
        if (a.DType != b.DType)
        {
            throw new ArgumentException($"{op}: tensors '{a.Name}' ({a.DType}) and '{b.Name}' ({b.DType}) must have the same dtype");
        }
    }

    private static void RequireElements(DeviceTensor tensor, long elements, string op,
        [InterpolatedStringHandlerArgument("tensor", "elements")] ref ExpectedShapeText expected)
    {
        if (tensor.ElementCount != elements)
        {
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' has shape {tensor.ShapeText} ({tensor.ElementCount} elements); expected {expected.ToStringAndClear()}");
        }
    }

    /// <summary>The expected shape of a <see cref="RequireElements"/> check, formatted only when the check fails.</summary>
    [InterpolatedStringHandler]
    internal ref struct ExpectedShapeText
    {
        private DefaultInterpolatedStringHandler _text;
        private readonly bool _failing;

        public ExpectedShapeText(int literalLength, int formattedCount, DeviceTensor tensor, long elements, out bool shouldAppend)
        {
            _failing = tensor.ElementCount != elements;
            shouldAppend = _failing;
            _text = _failing ? new DefaultInterpolatedStringHandler(literalLength, formattedCount) : default;
        }

        public void AppendLiteral(string value) => _text.AppendLiteral(value);

        public void AppendFormatted<T>(T value) => _text.AppendFormatted(value);

        public string ToStringAndClear() => _failing ? _text.ToStringAndClear() : "";
    }

    private static int Blocks(long items, int blockSize) => checked((int)((items + blockSize - 1) / blockSize));
}
