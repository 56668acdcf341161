using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;

namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>
/// One kernel file compiled for the emulated device. The shared library stays mapped until the process
/// ends even after <see cref="Dispose"/> (the runtime's worker threads hold its thread-locals; unloading it
/// under them is not worth the risk), but its functions can no longer be launched.
/// </summary>
public sealed partial class EmulatorModule : IKernelModule
{
    private readonly Dictionary<string, nint> _functions;

    internal EmulatorModule(KernelSource source, string libraryPath, bool loadedFromCache, Dictionary<string, nint> functions)
    {
        FileName = source.FileName;
        LibraryPath = libraryPath;
        LoadedFromCache = loadedFromCache;
        _functions = functions;
    }

    public string FileName { get; }

    /// <summary>The compiled shared library in the cache.</summary>
    public string LibraryPath { get; }

    /// <summary>False when this load ran g++; true when the cache already held the library.</summary>
    public bool LoadedFromCache { get; }

    public IReadOnlyCollection<string> FunctionNames => _functions.Keys;

    internal bool IsDisposed { get; private set; }

    public nint GetFunction(string name)
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        return _functions.TryGetValue(name, out nint handle)
            ? handle
            : throw new CudaException($"{FileName}: no kernel '{name}' (the file has: {string.Join(", ", _functions.Keys)})",
                EmulatorErrors.NotFound, fileName: FileName);
    }

    public void Dispose() => IsDisposed = true;

    /// <summary>`__launch_bounds__(N)` with a literal N, per entry point.</summary>
    internal static Dictionary<string, int> LaunchBounds(string text) =>
        LaunchBoundsPattern().Matches(text).ToDictionary(match => match.Groups[2].Value, match => int.Parse(match.Groups[1].Value),
            StringComparer.Ordinal);

    [GeneratedRegex(@"extern\s+""C""\s+__global__\s+__launch_bounds__\s*\(\s*(\d+)\s*(?:,[^)]*)?\)\s+void\s+(\w+)\s*\(")]
    private static partial Regex LaunchBoundsPattern();
}

/// <summary>One launchable kernel of a module (what a function handle of the emulator stands for).</summary>
internal sealed record EmulatedKernel(EmulatorModule Module, string Name, nint Thunk, nint Enter, int ParameterCount,
    int? LaunchBounds, nint StaticShared, ulong StaticSharedBytes)
{
    /// <summary>sizeof of each parameter (a graph capture copies the values a launch's arguments point at).</summary>
    public required int[] ParameterSizes { get; init; }
}

/// <summary>Maps a code address of a faulting access back to source lines with addr2line (binutils, which
/// g++ needs anyway); best effort: null when it is missing or knows nothing.</summary>
internal static partial class SourceLocator
{
    public static string? Locate(string libraryPath, ulong offset)
    {
        try
        {
            var start = new ProcessStartInfo("addr2line") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (string argument in new[] { "-f", "-i", "-C", "-e", libraryPath, $"0x{offset:x}" })
            {
                start.ArgumentList.Add(argument);
            }
            using var process = Process.Start(start);
            if (process is null)
            {
                return null;
            }
            string[] lines = process.StandardOutput.ReadToEnd().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            process.WaitForExit();
            var frames = new List<string>();
            for (int i = 0; i + 1 < lines.Length; i += 2)
            {
                string place = Discriminator().Replace(lines[i + 1], "");
                int colon = place.LastIndexOf(':');
                if (colon <= 0 || place.StartsWith("??", StringComparison.Ordinal))
                {
                    continue;
                }
                string function = lines[i].Split('(')[0];
                frames.Add($"{Path.GetFileName(place[..colon])}:{place[(colon + 1)..]} ({function})");
            }
            return frames.Count == 0 ? null : string.Join(", inlined in ", frames);
        }
        catch (Exception error) when (error is System.ComponentModel.Win32Exception or IOException or InvalidOperationException)
        {
            return null;
        }
    }

    [GeneratedRegex(@"\s*\(discriminator \d+\)")]
    private static partial Regex Discriminator();
}

/// <summary>klm_kernel.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct KlmKernel
{
    public nint Name;
    public nint Thunk;
    public int ParameterCount;
    public nint ParameterSizes;   // const unsigned int*
}
