using System.Text.Json;

namespace KernelLM.Runtime.SafeTensors;

/// <summary>
/// All safetensors files of a model folder: `model.safetensors.index.json` (sharded), a single
/// `model.safetensors`, or else every `*.safetensors` in the folder. Tensor names are unique across shards.
/// </summary>
public sealed class SafeTensorsArchive : IDisposable
{
    public const string IndexFileName = "model.safetensors.index.json";

    private readonly List<SafeTensorsFile> _files;
    private readonly Dictionary<string, TensorView> _tensors;

    private SafeTensorsArchive(List<SafeTensorsFile> files, Dictionary<string, TensorView> tensors)
    {
        _files = files;
        _tensors = tensors;
    }

    public IReadOnlyList<SafeTensorsFile> Files => _files;
    public IReadOnlyDictionary<string, TensorView> Tensors => _tensors;

    /// <summary>Total bytes of tensor data across all shards.</summary>
    public long DataBytes => _tensors.Values.Sum(t => t.ByteLength);

    public bool TryGetTensor(string name, out TensorView tensor) => _tensors.TryGetValue(name, out tensor);

    public static SafeTensorsArchive Open(string directory)
    {
        if (!Directory.Exists(directory))
        {
            throw new SafeTensorsException(directory, null, SafeTensorsError.FileNotFound, "model folder not found");
        }
        string indexPath = Path.Combine(directory, IndexFileName);
        if (File.Exists(indexPath))
        {
            return OpenSharded(directory, indexPath);
        }
        string single = Path.Combine(directory, "model.safetensors");
        string[] paths = File.Exists(single)
            ? [single]
            : Directory.GetFiles(directory, "*.safetensors").Order(StringComparer.Ordinal).ToArray();
        if (paths.Length == 0)
        {
            throw new SafeTensorsException(directory, null, SafeTensorsError.FileNotFound,
                $"no model.safetensors, {IndexFileName} or *.safetensors in the folder");
        }
        return OpenFiles(paths, expected: null);
    }

    private static SafeTensorsArchive OpenSharded(string directory, string indexPath)
    {
        var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
        try
        {
            using var document = JsonDocument.Parse(File.ReadAllBytes(indexPath));
            if (!document.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
            {
                throw new SafeTensorsException(indexPath, null, SafeTensorsError.InvalidIndex, "no 'weight_map' object");
            }
            foreach (var entry in map.EnumerateObject())
            {
                string? file = entry.Value.ValueKind == JsonValueKind.String ? entry.Value.GetString() : null;
                if (string.IsNullOrEmpty(file) || file.Contains('/', StringComparison.Ordinal) || file.Contains('\\', StringComparison.Ordinal) || file.StartsWith('.'))
                {
                    throw new SafeTensorsException(indexPath, entry.Name, SafeTensorsError.InvalidIndex, "weight_map value must be a file name in the model folder");
                }
                weightMap[entry.Name] = file;
            }
        }
        catch (JsonException error)
        {
            throw new SafeTensorsException(indexPath, null, SafeTensorsError.InvalidIndex, $"index is not valid JSON: {error.Message}");
        }
        string[] paths = weightMap.Values.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal)
            .Select(file => Path.Combine(directory, file)).ToArray();
        var archive = OpenFiles(paths, weightMap);
        return archive;
    }

    private static SafeTensorsArchive OpenFiles(string[] paths, Dictionary<string, string>? expected)
    {
        var files = new List<SafeTensorsFile>();
        try
        {
            var tensors = new Dictionary<string, TensorView>(StringComparer.Ordinal);
            var owner = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (string path in paths)
            {
                var file = SafeTensorsFile.Open(path);
                files.Add(file);
                foreach (var tensor in file.Tensors)
                {
                    if (owner.TryGetValue(tensor.Name, out string? other))
                    {
                        throw new SafeTensorsException(path, tensor.Name, SafeTensorsError.DuplicateTensor, $"tensor also stored in {Path.GetFileName(other)}");
                    }
                    owner[tensor.Name] = path;
                    tensors[tensor.Name] = tensor;
                }
            }
            if (expected is not null)
            {
                foreach (var (name, file) in expected)
                {
                    if (!owner.TryGetValue(name, out string? actual) || Path.GetFileName(actual) != file)
                    {
                        throw new SafeTensorsException(Path.Combine(Path.GetDirectoryName(paths[0]) ?? ".", file), name, SafeTensorsError.MissingTensor,
                            $"{IndexFileName} maps the tensor to this shard, which does not hold it");
                    }
                }
            }
            return new SafeTensorsArchive(files, tensors);
        }
        catch
        {
            foreach (var file in files)
            {
                file.Dispose();
            }
            throw;
        }
    }

    public void Dispose()
    {
        foreach (var file in _files)
        {
            file.Dispose();
        }
        _files.Clear();
    }
}
