namespace KernelLM.Runtime;

/// <summary>Element types a tensor can hold. Only F32, F16 and BF16 are computed with; the rest are
/// recognised so that a safetensors header can be validated and a clear error raised.</summary>
public enum DType
{
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

public static class DTypeInfo
{
    public static int SizeOf(this DType type) => type switch
    {
        DType.F64 or DType.I64 or DType.U64 => 8,
        DType.F32 or DType.I32 or DType.U32 => 4,
        DType.F16 or DType.BF16 or DType.I16 or DType.U16 => 2,
        DType.I8 or DType.U8 or DType.Bool or DType.F8E4M3 or DType.F8E5M2 => 1,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, null),
    };

    /// <summary>True for the dtypes the kernels compute with.</summary>
    public static bool IsSupported(this DType type) => type is DType.F32 or DType.F16 or DType.BF16;

    /// <summary>The safetensors spelling ("BF16", "F8_E4M3", ...), or null when unknown.</summary>
    public static DType? FromSafeTensorsName(string name) => name switch
    {
        "F32" => DType.F32,
        "F16" => DType.F16,
        "BF16" => DType.BF16,
        "F64" => DType.F64,
        "I64" => DType.I64,
        "I32" => DType.I32,
        "I16" => DType.I16,
        "I8" => DType.I8,
        "U64" => DType.U64,
        "U32" => DType.U32,
        "U16" => DType.U16,
        "U8" => DType.U8,
        "BOOL" => DType.Bool,
        "F8_E4M3" => DType.F8E4M3,
        "F8_E5M2" => DType.F8E5M2,
        _ => null,
    };

    public static string ToSafeTensorsName(this DType type) => type switch
    {
        DType.Bool => "BOOL",
        DType.F8E4M3 => "F8_E4M3",
        DType.F8E5M2 => "F8_E5M2",
        _ => type.ToString().ToUpperInvariant(),
    };
}
