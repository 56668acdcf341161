namespace KernelLM.Runtime;

/// <summary>
/// A 2-D weight in its stored dtype (F32, F16 or BF16), row-major [Rows, Cols] = [out_features, in_features]
/// as PyTorch's nn.Linear stores it. Zero-copy: points into the memory-mapped safetensors file.
/// </summary>
public readonly unsafe struct WeightMatrix
{
    public WeightMatrix(string name, DType dtype, int rows, int cols, byte* data)
    {
        if (!dtype.IsSupported())
        {
            throw new KernelLMException($"tensor '{name}': dtype {dtype.ToSafeTensorsName()} is not supported (F32, F16, BF16 are)");
        }
        Name = name;
        DType = dtype;
        Rows = rows;
        Cols = cols;
        Data = data;
    }

    public static WeightMatrix From(TensorView tensor)
    {
        if (tensor.Rank != 2)
        {
            throw new KernelLMException($"tensor '{tensor.Name}' has shape {tensor.ShapeText}, expected a matrix");
        }
        return new WeightMatrix(tensor.Name, tensor.DType, tensor.Shape[0], tensor.Shape[1], tensor.Data);
    }

    public string Name { get; }
    public DType DType { get; }
    public int Rows { get; }
    public int Cols { get; }
    public byte* Data { get; }

    public long ByteLength => (long)Rows * Cols * DType.SizeOf();

    public byte* Row(int row) => Data + (long)row * Cols * DType.SizeOf();

    public float Get(int row, int col) => DType switch
    {
        DType.F32 => ((float*)Data)[(long)row * Cols + col],
        DType.F16 => (float)((Half*)Data)[(long)row * Cols + col],
        _ => BFloat16.ToSingle(((ushort*)Data)[(long)row * Cols + col]),
    };

    /// <summary>Widens one row into fp32.</summary>
    public void ReadRow(int row, Span<float> destination)
    {
        var span = destination[..Cols];
        switch (DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>(Row(row), Cols).CopyTo(span);
                break;
            case DType.F16:
                System.Numerics.Tensors.TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(Row(row), Cols), span);
                break;
            default:
                BFloat16.ToSingle(new ReadOnlySpan<ushort>(Row(row), Cols), span);
                break;
        }
    }
}
