using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Text.Json;

namespace KernelLM.Runtime.SafeTensors;

/// <summary>
/// One memory-mapped safetensors file: `u64 little-endian header length N | N bytes of JSON header | data`.
/// The header is validated the way the reference implementation (huggingface/safetensors) does before
/// any tensor is handed out, so a corrupt or truncated file fails here with a typed error naming the file
/// and tensor, instead of an access violation later. Tensors are zero-copy views over the mapping.
/// </summary>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    /// <summary>The reference implementation's cap on the JSON header (100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly MemoryMappedFile? _mapping;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly Dictionary<string, TensorView> _tensors;
    private byte* _base;

    private SafeTensorsFile(string path, MemoryMappedFile? mapping, MemoryMappedViewAccessor? view, byte* basePointer,
        Dictionary<string, TensorView> tensors, IReadOnlyDictionary<string, string> metadata, long fileLength)
    {
        FilePath = path;
        _mapping = mapping;
        _view = view;
        _base = basePointer;
        _tensors = tensors;
        Metadata = metadata;
        FileLength = fileLength;
    }

    public string FilePath { get; }
    public long FileLength { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    public IReadOnlyCollection<string> TensorNames => _tensors.Keys;
    public IEnumerable<TensorView> Tensors => _tensors.Values;

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public bool TryGetTensor(string name, out TensorView tensor)
    {
        ObjectDisposedException.ThrowIf(_base == null && _view != null, this);
        return _tensors.TryGetValue(name, out tensor);
    }

    public TensorView GetTensor(string name) =>
        TryGetTensor(name, out var tensor)
            ? tensor
            : throw new SafeTensorsException(FilePath, name, SafeTensorsError.MissingTensor, "no such tensor in this file");

    public static SafeTensorsFile Open(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.FileNotFound, "file not found");
        }
        long fileLength = info.Length;
        if (fileLength < 8)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.HeaderTooSmall,
                $"file is {fileLength} bytes, too short for the 8-byte header length (truncated?)");
        }

        MemoryMappedFile? mapping = null;
        MemoryMappedViewAccessor? view = null;
        byte* basePointer = null;
        bool acquired = false;
        try
        {
            mapping = MemoryMappedFile.CreateFromFile(path, FileMode.Open, mapName: null, capacity: 0, MemoryMappedFileAccess.Read);
            view = mapping.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePointer);
            acquired = true;
            basePointer += view.PointerOffset;
            var (tensors, metadata) = ParseHeader(path, basePointer, fileLength);
            return new SafeTensorsFile(path, mapping, view, basePointer, tensors, metadata, fileLength);
        }
        catch (Exception error) when (error is IOException or UnauthorizedAccessException)
        {
            Release();
            throw new SafeTensorsException(path, null, SafeTensorsError.FileNotFound, $"cannot map file: {error.Message}");
        }
        catch
        {
            Release();
            throw;
        }

        void Release()
        {
            if (acquired)
            {
                view!.SafeMemoryMappedViewHandle.ReleasePointer();
            }
            view?.Dispose();
            mapping?.Dispose();
        }
    }

    private static (Dictionary<string, TensorView>, IReadOnlyDictionary<string, string>) ParseHeader(string path, byte* basePointer, long fileLength)
    {
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(new ReadOnlySpan<byte>(basePointer, 8));
        if (headerLength > MaxHeaderBytes)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.HeaderTooLarge,
                $"header length {headerLength} exceeds the {MaxHeaderBytes}-byte limit (corrupt length prefix?)");
        }
        if ((long)headerLength > fileLength - 8)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderLength,
                $"header length {headerLength} runs past the end of the {fileLength}-byte file (truncated?)");
        }
        if (headerLength < 2)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, $"header of {headerLength} bytes cannot hold a JSON object");
        }

        var headerBytes = new ReadOnlySpan<byte>(basePointer + 8, (int)headerLength);
        if (headerBytes[0] != (byte)'{')
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, "header does not start with '{'");
        }

        // JsonDocument does not validate UTF-8 inside strings; GetString would throw an untyped
        // InvalidOperationException on the first bad name, so reject the header up front as the reference does.
        if (!System.Text.Unicode.Utf8.IsValid(headerBytes))
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, "header is not valid UTF-8");
        }

        long dataStart = 8 + (long)headerLength;
        long dataLength = fileLength - dataStart;
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(headerBytes.ToArray(), new JsonDocumentOptions { MaxDepth = 8 });
        }
        catch (JsonException error)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, $"header is not valid JSON: {error.Message}");
        }

        // Every value kind is checked before it is read, so the only InvalidOperationException left is
        // JsonElement failing to transcode a string (a lone surrogate escape such as "\ud800" in a name).
        try
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, "header is not a JSON object");
            }

            var tensors = new Dictionary<string, TensorView>(StringComparer.Ordinal);
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var ranges = new List<(long Begin, long End, string Name)>();
            foreach (var property in document.RootElement.EnumerateObject())
            {
                string name = property.Name;
                if (name == "__metadata__")
                {
                    ReadMetadata(path, property.Value, metadata);
                    continue;
                }
                if (tensors.ContainsKey(name))
                {
                    throw new SafeTensorsException(path, name, SafeTensorsError.DuplicateTensor, "tensor is listed twice in the header");
                }
                var (dtype, shape, begin, end) = ReadEntry(path, name, property.Value, dataLength);
                tensors[name] = new TensorView(name, dtype, shape, basePointer + dataStart + begin, end - begin);
                ranges.Add((begin, end, name));
            }

            // The reference implementation requires the tensors to tile the data region exactly:
            // sorted by offset, each begins where the previous ended, and the last ends at the file's end.
            ranges.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
            long expected = 0;
            string? previous = null;
            foreach (var (begin, end, name) in ranges)
            {
                if (begin < expected)
                {
                    throw new SafeTensorsException(path, name, SafeTensorsError.OverlappingTensors,
                        $"data_offsets [{begin}, {end}] overlap tensor '{previous}' which ends at {expected}");
                }
                if (begin > expected)
                {
                    throw new SafeTensorsException(path, name, SafeTensorsError.InvalidOffsets,
                        $"data_offsets begin at {begin}, leaving a gap after byte {expected} of the data region");
                }
                expected = end;
                previous = name;
            }
            if (expected != dataLength)
            {
                throw new SafeTensorsException(path, previous, SafeTensorsError.IncompleteDataRegion,
                    $"tensors cover {expected} bytes but the data region holds {dataLength} (truncated or padded file?)");
            }
            return (tensors, metadata);
        }
        catch (InvalidOperationException error)
        {
            throw new SafeTensorsException(path, null, SafeTensorsError.InvalidHeaderJson, $"header holds a string that is not valid UTF-16: {error.Message}");
        }
        finally
        {
            document.Dispose();
        }
    }

    private static void ReadMetadata(string path, JsonElement value, Dictionary<string, string> metadata)
    {
        if (value.ValueKind != JsonValueKind.Object)
        {
            throw new SafeTensorsException(path, "__metadata__", SafeTensorsError.InvalidTensorEntry, "__metadata__ must be an object of strings");
        }
        foreach (var item in value.EnumerateObject())
        {
            if (item.Value.ValueKind != JsonValueKind.String)
            {
                throw new SafeTensorsException(path, "__metadata__", SafeTensorsError.InvalidTensorEntry, $"metadata value '{item.Name}' is not a string");
            }
            metadata[item.Name] = item.Value.GetString()!;
        }
    }

    private static (DType, int[], long, long) ReadEntry(string path, string name, JsonElement entry, long dataLength)
    {
        if (entry.ValueKind != JsonValueKind.Object)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidTensorEntry, "entry is not an object");
        }
        if (!entry.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidTensorEntry, "missing or non-string 'dtype'");
        }
        string dtypeName = dtypeElement.GetString()!;
        var dtype = DTypeInfo.FromSafeTensorsName(dtypeName)
            ?? throw new SafeTensorsException(path, name, SafeTensorsError.UnknownDType, $"unknown dtype '{dtypeName}'");

        if (!entry.TryGetProperty("shape", out var shapeElement) || shapeElement.ValueKind != JsonValueKind.Array)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidShape, "missing or non-array 'shape'");
        }
        var shape = new int[shapeElement.GetArrayLength()];
        long elements = 1;
        int axis = 0;
        foreach (var dimension in shapeElement.EnumerateArray())
        {
            if (dimension.ValueKind != JsonValueKind.Number || !dimension.TryGetInt64(out long size) || size < 0 || size > int.MaxValue)
            {
                throw new SafeTensorsException(path, name, SafeTensorsError.InvalidShape, $"shape dimension {axis} is not a non-negative integer below 2^31");
            }
            shape[axis++] = (int)size;
            try
            {
                elements = checked(elements * size);
            }
            catch (OverflowException)
            {
                throw new SafeTensorsException(path, name, SafeTensorsError.InvalidShape, "shape's element count overflows");
            }
        }

        if (!entry.TryGetProperty("data_offsets", out var offsets) || offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidOffsets, "missing 'data_offsets' [begin, end]");
        }
        // TryGetInt64 throws (untyped) on a non-number, so the kind is checked first.
        if (offsets[0].ValueKind != JsonValueKind.Number || offsets[1].ValueKind != JsonValueKind.Number
            || !offsets[0].TryGetInt64(out long begin) || !offsets[1].TryGetInt64(out long end) || begin < 0 || end < begin)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidOffsets, "data_offsets must be integers with 0 <= begin <= end");
        }
        if (end > dataLength)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidOffsets,
                $"data_offsets [{begin}, {end}] run past the data region of {dataLength} bytes (truncated file?)");
        }

        long expectedBytes;
        try
        {
            expectedBytes = checked(elements * dtype.SizeOf());
        }
        catch (OverflowException)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.InvalidShape, "shape x dtype size overflows");
        }
        if (expectedBytes != end - begin)
        {
            throw new SafeTensorsException(path, name, SafeTensorsError.ShapeSizeMismatch,
                $"shape [{string.Join(", ", shape)}] x {dtypeName} ({dtype.SizeOf()} bytes) = {expectedBytes} bytes, but data_offsets span {end - begin}");
        }
        return (dtype, shape, begin, end);
    }

    public void Dispose()
    {
        if (_view is not null && _base != null)
        {
            _base = null;
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
        _view?.Dispose();
        _mapping?.Dispose();
    }
}
