namespace KernelLM.Runtime;

/// <summary>
/// A read-only, zero-copy view of a tensor that lives in memory owned by someone else (a memory-mapped
/// safetensors file). Row-major; <see cref="Shape"/> is outermost first. Valid while the owner is alive.
/// </summary>
public readonly unsafe struct TensorView
{
    public TensorView(string name, DType dtype, int[] shape, byte* data, long byteLength)
    {
        Name = name;
        DType = dtype;
        Shape = shape;
        Data = data;
        ByteLength = byteLength;
    }

    public string Name { get; }
    public DType DType { get; }
    public int[] Shape { get; }
    public byte* Data { get; }
    public long ByteLength { get; }

    public int Rank => Shape.Length;

    public long ElementCount
    {
        get
        {
            long count = 1;
            foreach (int dimension in Shape)
            {
                count *= dimension;
            }
            return count;
        }
    }

    public ReadOnlySpan<byte> Bytes => new(Data, checked((int)ByteLength));

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";

    /// <summary>Reads element <paramref name="index"/> widened to float (tests, small vectors).</summary>
    public float GetFloat(long index) => DType switch
    {
        DType.F32 => ((float*)Data)[index],
        DType.F16 => (float)((Half*)Data)[index],
        DType.BF16 => BFloat16.ToSingle(((ushort*)Data)[index]),
        _ => throw new KernelLMException($"tensor '{Name}': dtype {DType.ToSafeTensorsName()} cannot be read as float"),
    };

    /// <summary>Copies the tensor into a new fp32 array (small tensors only: norms, biases, tests).</summary>
    public float[] ToFloatArray()
    {
        var result = new float[ElementCount];
        ConvertTo(result);
        return result;
    }

    public void ConvertTo(Span<float> destination)
    {
        if (destination.Length != ElementCount)
        {
            throw new ArgumentException($"tensor '{Name}' has {ElementCount} elements, destination {destination.Length}", nameof(destination));
        }
        int count = destination.Length;
        switch (DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>(Data, count).CopyTo(destination);
                break;
            case DType.F16:
                System.Numerics.Tensors.TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(Data, count), destination);
                break;
            case DType.BF16:
                BFloat16.ToSingle(new ReadOnlySpan<ushort>(Data, count), destination);
                break;
            default:
                throw new KernelLMException($"tensor '{Name}': dtype {DType.ToSafeTensorsName()} is not supported (F32, F16, BF16 are)");
        }
    }
}
