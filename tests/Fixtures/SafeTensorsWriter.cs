using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using KernelLM.Runtime;

namespace KernelLM.Tests.Fixtures;

/// <summary>
/// Writes safetensors files the way huggingface/safetensors does (u64-LE header length, JSON header padded
/// with spaces to a multiple of 8, tensor data back to back), so tests can build valid files and, through
/// <see cref="WriteRaw"/> and <see cref="Serialize"/>, deliberately broken ones. Nothing is validated here:
/// a test that wants a shape that disagrees with its bytes must be able to write one.
/// </summary>
public static class SafeTensorsWriter
{
    public static void Write(string path, IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        WriteRaw(path, Header(tensors, metadata), Concatenate(tensors.Select(tensor => tensor.Data)));
    }

    /// <summary>The JSON header <see cref="Write"/> would store, unpadded.</summary>
    public static string Header(IReadOnlyList<(string Name, DType DType, int[] Shape, byte[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        return Header(tensors.Select(t => (t.Name, t.DType, t.Shape, (long)t.Data.Length)).ToList(), metadata);
    }

    /// <summary>The header for tensors stored back to back with the given byte lengths (for writers that stream
    /// the data, like the benchmarks' 1B-shaped model).</summary>
    public static string Header(IReadOnlyList<(string Name, DType DType, int[] Shape, long ByteLength)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream))
        {
            json.WriteStartObject();
            if (metadata is not null)
            {
                json.WriteStartObject("__metadata__");
                foreach (var (key, value) in metadata)
                {
                    json.WriteString(key, value);
                }
                json.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, dtype, shape, byteLength) in tensors)
            {
                json.WriteStartObject(name);
                json.WriteString("dtype", dtype.ToSafeTensorsName());
                json.WriteStartArray("shape");
                foreach (int dimension in shape)
                {
                    json.WriteNumberValue(dimension);
                }
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                offset += byteLength;
                json.WriteNumberValue(offset);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray());
    }

    /// <summary>Writes <paramref name="headerJson"/> verbatim (padded) followed by <paramref name="data"/>.</summary>
    public static void WriteRaw(string path, string headerJson, byte[] data) => File.WriteAllBytes(path, Serialize(headerJson, data));

    /// <summary>The bytes of a file: header length, header padded with spaces to a multiple of 8, data.</summary>
    public static byte[] Serialize(string headerJson, byte[] data)
    {
        ArgumentNullException.ThrowIfNull(headerJson);
        ArgumentNullException.ThrowIfNull(data);
        byte[] header = Encoding.UTF8.GetBytes(headerJson);
        // The reference writer pads with spaces so that the data region starts 8-byte aligned.
        int padded = (header.Length + 7) / 8 * 8;
        var bytes = new byte[8 + padded + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)padded);
        header.CopyTo(bytes, 8);
        bytes.AsSpan(8 + header.Length, padded - header.Length).Fill((byte)' ');
        data.CopyTo(bytes, 8 + padded);
        return bytes;
    }

    public static byte[] Encode(DType dtype, ReadOnlySpan<float> values) => dtype switch
    {
        DType.F32 => EncodeF32(values),
        DType.F16 => EncodeF16(values),
        DType.BF16 => EncodeBF16(values),
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "only F32, F16 and BF16 are encoded from floats"),
    };

    public static byte[] EncodeF32(ReadOnlySpan<float> values)
    {
        var bytes = new byte[values.Length * sizeof(float)];
        for (int i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * sizeof(float)), values[i]);
        }
        return bytes;
    }

    public static byte[] EncodeF16(ReadOnlySpan<float> values)
    {
        var bytes = new byte[values.Length * 2];
        for (int i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteHalfLittleEndian(bytes.AsSpan(i * 2), (Half)values[i]);
        }
        return bytes;
    }

    public static byte[] EncodeBF16(ReadOnlySpan<float> values)
    {
        var bytes = new byte[values.Length * 2];
        for (int i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(i * 2), BFloat16.FromSingle(values[i]));
        }
        return bytes;
    }

    public static byte[] Concatenate(IEnumerable<byte[]> parts)
    {
        ArgumentNullException.ThrowIfNull(parts);
        using var stream = new MemoryStream();
        foreach (byte[] part in parts)
        {
            stream.Write(part);
        }
        return stream.ToArray();
    }
}
