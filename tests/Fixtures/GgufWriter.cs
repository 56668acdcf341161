using System.Buffers.Binary;
using System.Text;

namespace KernelLM.Tests.Fixtures;

/// <summary>GGUF metadata value types, named as in gguf.h (enum gguf_type).</summary>
public enum GgufValueType : uint
{
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
}

/// <summary>The ggml tensor types this writer stores, named as in ggml.h (enum ggml_type): the unquantised ones.</summary>
public enum GgmlType : uint
{
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_BF16 = 30,
}

/// <summary>
/// Writes GGUF v3 files (the format llama.cpp reads), little-endian:
///
///   header:       u32 magic "GGUF" | u32 version 3 | u64 tensor count | u64 metadata count
///   metadata:     per entry: string key | u32 value type | value
///                 (string = u64 byte length + UTF-8 bytes, no terminator;
///                  array  = u32 element type | u64 count | elements)
///   tensor infos: per tensor: string name | u32 n_dims | u64 ne[n_dims] (innermost first: ne0 is the
///                 contiguous dimension, so a PyTorch [out, in] matrix is ne = [in, out]) | u32 ggml type |
///                 u64 offset of its data from the start of the data section (a multiple of the alignment)
///   padding to general.alignment (32 unless the metadata says otherwise), then the tensor data, each
///   tensor padded to the alignment.
///
/// Tensor data is streamed by a callback at <see cref="Write"/> time, so multi-gigabyte models never sit in
/// memory. Nothing is validated beyond what the format needs (names unique, sizes consistent).
/// </summary>
public sealed class GgufWriter
{
    public const uint Magic = 0x46554747; // "GGUF" read as a little-endian u32
    public const uint Version = 3;
    public const int DefaultAlignment = 32;

    private readonly List<(string Key, GgufValueType Type, object Value)> _metadata = [];
    private readonly List<TensorEntry> _tensors = [];
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);

    private sealed record TensorEntry(string Name, GgmlType Type, long[] Dimensions, long ByteLength, Action<Stream> WriteData);

    public int Alignment { get; private set; } = DefaultAlignment;

    public IReadOnlyList<string> TensorNames => _tensors.Select(tensor => tensor.Name).ToList();

    public void Add(string key, string value) => AddValue(key, GgufValueType.GGUF_TYPE_STRING, value);

    public void Add(string key, uint value)
    {
        if (key == "general.alignment")
        {
            if (value == 0 || value % 8 != 0)
            {
                throw new ArgumentOutOfRangeException(nameof(value), value, "general.alignment must be a positive multiple of 8");
            }
            Alignment = (int)value;
        }
        AddValue(key, GgufValueType.GGUF_TYPE_UINT32, value);
    }

    public void Add(string key, int value) => AddValue(key, GgufValueType.GGUF_TYPE_INT32, value);

    public void Add(string key, float value) => AddValue(key, GgufValueType.GGUF_TYPE_FLOAT32, value);

    public void Add(string key, bool value) => AddValue(key, GgufValueType.GGUF_TYPE_BOOL, value);

    public void Add(string key, ulong value) => AddValue(key, GgufValueType.GGUF_TYPE_UINT64, value);

    public void Add(string key, IReadOnlyList<string> values) => AddValue(key, GgufValueType.GGUF_TYPE_ARRAY, (GgufValueType.GGUF_TYPE_STRING, (object)values));

    public void Add(string key, IReadOnlyList<int> values) => AddValue(key, GgufValueType.GGUF_TYPE_ARRAY, (GgufValueType.GGUF_TYPE_INT32, (object)values));

    public void Add(string key, IReadOnlyList<float> values) => AddValue(key, GgufValueType.GGUF_TYPE_ARRAY, (GgufValueType.GGUF_TYPE_FLOAT32, (object)values));

    private void AddValue(string key, GgufValueType type, object value)
    {
        ArgumentException.ThrowIfNullOrEmpty(key);
        if (_metadata.Any(entry => entry.Key == key))
        {
            throw new ArgumentException($"metadata key '{key}' is already set", nameof(key));
        }
        _metadata.Add((key, type, value));
    }

    /// <summary>
    /// Declares a tensor. <paramref name="dimensions"/> are ggml's ne, innermost first. <paramref name="writeData"/>
    /// is called once during <see cref="Write"/> and must write exactly the tensor's bytes (ne product x type size).
    /// </summary>
    public void AddTensor(string name, GgmlType type, long[] dimensions, Action<Stream> writeData)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(dimensions);
        ArgumentNullException.ThrowIfNull(writeData);
        if (!_names.Add(name))
        {
            throw new ArgumentException($"tensor '{name}' is already added", nameof(name));
        }
        if (dimensions.Length is < 1 or > 4 || dimensions.Any(dimension => dimension <= 0))
        {
            throw new ArgumentException($"tensor '{name}': ggml tensors have 1 to 4 positive dimensions, got [{string.Join(", ", dimensions)}]", nameof(dimensions));
        }
        long elements = dimensions.Aggregate(1L, (product, dimension) => product * dimension);
        _tensors.Add(new TensorEntry(name, type, dimensions, elements * SizeOf(type), writeData));
    }

    /// <summary>Declares a tensor whose bytes are already in memory.</summary>
    public void AddTensor(string name, GgmlType type, long[] dimensions, byte[] data)
    {
        ArgumentNullException.ThrowIfNull(data);
        AddTensor(name, type, dimensions, stream => stream.Write(data));
    }

    public static int SizeOf(GgmlType type) => type switch
    {
        GgmlType.GGML_TYPE_F32 => 4,
        GgmlType.GGML_TYPE_F16 => 2,
        GgmlType.GGML_TYPE_BF16 => 2,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "not an unquantised ggml type"),
    };

    public void Write(string path)
    {
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        Write(file);
    }

    public void Write(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        using var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
        writer.Write(Magic);
        writer.Write(Version);
        writer.Write((ulong)_tensors.Count);
        writer.Write((ulong)_metadata.Count);
        foreach (var (key, type, value) in _metadata)
        {
            WriteString(writer, key);
            writer.Write((uint)type);
            WriteValue(writer, type, value);
        }

        long offset = 0;
        var offsets = new long[_tensors.Count];
        for (int i = 0; i < _tensors.Count; i++)
        {
            var tensor = _tensors[i];
            offsets[i] = offset;
            WriteString(writer, tensor.Name);
            writer.Write((uint)tensor.Dimensions.Length);
            foreach (long dimension in tensor.Dimensions)
            {
                writer.Write((ulong)dimension);
            }
            writer.Write((uint)tensor.Type);
            writer.Write((ulong)offset);
            offset = Align(offset + tensor.ByteLength);
        }
        writer.Flush();
        Pad(stream, Align(stream.Position) - stream.Position);

        long dataStart = stream.Position;
        for (int i = 0; i < _tensors.Count; i++)
        {
            var tensor = _tensors[i];
            long before = stream.Position;
            if (before - dataStart != offsets[i])
            {
                throw new InvalidOperationException($"tensor '{tensor.Name}': data would start at {before - dataStart}, its info says {offsets[i]}");
            }
            tensor.WriteData(stream);
            long written = stream.Position - before;
            if (written != tensor.ByteLength)
            {
                throw new InvalidOperationException($"tensor '{tensor.Name}': {written} bytes written, its shape and type need {tensor.ByteLength}");
            }
            Pad(stream, Align(written) - written);
        }
    }

    private long Align(long value) => (value + Alignment - 1) / Alignment * Alignment;

    private static void Pad(Stream stream, long count)
    {
        Span<byte> zeros = stackalloc byte[64];
        zeros.Clear();
        while (count > 0)
        {
            int chunk = (int)Math.Min(count, zeros.Length);
            stream.Write(zeros[..chunk]);
            count -= chunk;
        }
    }

    private static void WriteString(BinaryWriter writer, string value)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(value);
        writer.Write((ulong)bytes.Length);
        writer.Write(bytes);
    }

    private static void WriteValue(BinaryWriter writer, GgufValueType type, object value)
    {
        switch (type)
        {
            case GgufValueType.GGUF_TYPE_STRING:
                WriteString(writer, (string)value);
                break;
            case GgufValueType.GGUF_TYPE_UINT32:
                writer.Write((uint)value);
                break;
            case GgufValueType.GGUF_TYPE_INT32:
                writer.Write((int)value);
                break;
            case GgufValueType.GGUF_TYPE_FLOAT32:
                writer.Write((float)value);
                break;
            case GgufValueType.GGUF_TYPE_BOOL:
                writer.Write((byte)((bool)value ? 1 : 0));
                break;
            case GgufValueType.GGUF_TYPE_UINT64:
                writer.Write((ulong)value);
                break;
            case GgufValueType.GGUF_TYPE_ARRAY:
                var (elementType, elements) = ((GgufValueType, object))value;
                writer.Write((uint)elementType);
                switch (elements)
                {
                    case IReadOnlyList<string> strings:
                        writer.Write((ulong)strings.Count);
                        foreach (string element in strings)
                        {
                            WriteString(writer, element);
                        }
                        break;
                    case IReadOnlyList<int> integers:
                        writer.Write((ulong)integers.Count);
                        foreach (int element in integers)
                        {
                            writer.Write(element);
                        }
                        break;
                    case IReadOnlyList<float> floats:
                        writer.Write((ulong)floats.Count);
                        foreach (float element in floats)
                        {
                            writer.Write(element);
                        }
                        break;
                    default:
                        throw new InvalidOperationException($"unsupported GGUF array element type {elementType}");
                }
                break;
            default:
                throw new InvalidOperationException($"unsupported GGUF value type {type}");
        }
    }

    /// <summary>Little-endian fp32 bytes of <paramref name="values"/> (norms, biases, rope_freqs are stored as F32).</summary>
    public static byte[] F32Bytes(ReadOnlySpan<float> values)
    {
        var bytes = new byte[values.Length * sizeof(float)];
        for (int i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * sizeof(float)), values[i]);
        }
        return bytes;
    }
}
