using System.Reflection;
using System.Text.RegularExpressions;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// The kernel sources of `kernels/` (every `.cu` and `.cuh`), embedded in this assembly at build time so that
/// an installed engine needs no source tree. Each `.cu` becomes one <see cref="KernelSource"/> carrying all
/// headers by file name.
/// </summary>
public static partial class KernelSources
{
    private const string Prefix = "kernels/";
    private static readonly Lazy<KernelSource[]> s_all = new(Load);
    private static readonly Lazy<IReadOnlyDictionary<string, string>> s_headers = new(() => ReadResources(".cuh"));

    public static IReadOnlyList<KernelSource> All => s_all.Value;

    /// <summary>Every embedded header (`common.cuh`, ...) by file name: what each source's <see cref="KernelSource.Headers"/> holds.</summary>
    public static IReadOnlyDictionary<string, string> Headers => s_headers.Value;

    public static KernelSource Get(string fileName) =>
        All.FirstOrDefault(source => source.FileName == fileName)
        ?? throw new CudaException($"no kernel file '{fileName}' is embedded (have: {string.Join(", ", All.Select(s => s.FileName))})");

    [GeneratedRegex(@"extern\s+""C""\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+(\w+)\s*\(")]
    private static partial Regex EntryPoint();

    /// <summary>The extern "C" __global__ entry points declared in a source text.</summary>
    public static IReadOnlyList<string> FindEntryPoints(string text) =>
        EntryPoint().Matches(text).Select(match => match.Groups[1].Value).ToArray();

    private static KernelSource[] Load() =>
        ReadResources(".cu")
            .OrderBy(pair => pair.Key, StringComparer.Ordinal)
            .Select(pair => new KernelSource(pair.Key, pair.Value, Headers) { EntryPoints = FindEntryPoints(pair.Value) })
            .ToArray();

    private static Dictionary<string, string> ReadResources(string extension)
    {
        var assembly = typeof(KernelSources).Assembly;
        var texts = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (string resource in assembly.GetManifestResourceNames()
            .Where(name => name.StartsWith(Prefix, StringComparison.Ordinal) && name.EndsWith(extension, StringComparison.Ordinal)))
        {
            using var stream = assembly.GetManifestResourceStream(resource)!;
            using var reader = new StreamReader(stream);
            texts[resource[Prefix.Length..]] = reader.ReadToEnd();
        }
        return texts;
    }
}
