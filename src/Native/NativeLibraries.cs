using System.Collections.Concurrent;
using System.Reflection;
using System.Runtime.InteropServices;

namespace KernelLM.Native;

/// <summary>What the resolver found for one native library: where it was loaded from, or every name it
/// tried and why each failed (<see cref="Attempts"/>: `name: the loader's reason`). `kernellm doctor` prints these.</summary>
public sealed record NativeLibraryProbe(string Library, string? EnvironmentVariable, string? Override, IReadOnlyList<string> Attempts)
{
    /// <summary>The dlopen handle; zero when not found.</summary>
    public nint Handle { get; init; }

    /// <summary>The name or path that loaded (`libnvrtc.so.11.2`).</summary>
    public string? LoadedName { get; init; }

    /// <summary>The file the dynamic loader mapped (`/usr/lib/x86_64-linux-gnu/libnvrtc.so.11.2`), when it can say.</summary>
    public string? Path { get; init; }

    /// <summary><see cref="Path"/> with symbolic links followed (`.../libnvrtc.so.11.8.89`).</summary>
    public string? ResolvedPath { get; init; }

    public bool Found => Handle != 0;

    /// <summary>One line: `libnvrtc /usr/lib/.../libnvrtc.so.11.8.89`, or the names tried and the loader's reasons.</summary>
    public string Describe()
    {
        if (Found)
        {
            return $"lib{Library} {ResolvedPath ?? Path ?? LoadedName}" + (Override is null ? "" : $" (from {EnvironmentVariable})");
        }
        // Usually every name fails for the same reason: say it once.
        var reasons = Attempts.Select(attempt => attempt[(attempt.IndexOf(": ", StringComparison.Ordinal) + 2)..]).Distinct().ToArray();
        return reasons.Length == 1
            ? $"lib{Library} not found: tried {string.Join(", ", Attempts.Select(attempt => attempt[..attempt.IndexOf(": ", StringComparison.Ordinal)]))} ({reasons[0]})"
            : $"lib{Library} not found: tried {string.Join("; ", Attempts)}";
    }
}

/// <summary>
/// Finds the CUDA libraries for the [LibraryImport] bindings of this assembly. Each library is probed once, by
/// its versioned names (the unversioned `.so` names exist only where a CUDA toolkit's development files are
/// installed), unless an environment variable names the file to load; then only that file is tried. Loading
/// NVRTC also preloads the NVRTC builtins library of the same version, so that an NVRTC outside the loader's
/// search path (a pip wheel, a copied toolkit) finds it. Every probe is recorded for `doctor`.
/// </summary>
public static partial class NativeLibraries
{
    // The names the bindings' [LibraryImport] attributes use; the resolver maps them to files.
    public const string Cuda = "cuda";
    public const string Nvrtc = "nvrtc";
    public const string NvrtcBuiltins = "nvrtc-builtins";
    public const string Cublas = "cublas";
    public const string CublasLt = "cublasLt";

    private static readonly ConcurrentDictionary<string, Lazy<NativeLibraryProbe>> s_probes = new(StringComparer.Ordinal);
    private static int s_resolverRegistered;

    /// <summary>The environment variable that names a library's file, overriding the search.</summary>
    public static string? EnvironmentVariableFor(string library) => library switch
    {
        Cuda => "KERNELLM_LIBCUDA",
        Nvrtc => "KERNELLM_LIBNVRTC",
        Cublas => "KERNELLM_LIBCUBLAS",
        CublasLt => "KERNELLM_LIBCUBLASLT",
        _ => null,
    };

    /// <summary>The names tried, in order, when no environment variable overrides the search.</summary>
    public static IReadOnlyList<string> CandidateNames(string library) => library switch
    {
        Cuda => ["libcuda.so.1", "libcuda.so"],
        // libnvrtc.so.11.2 is the soname of every NVRTC 11.x from 11.2 on (Debian's libnvrtc11.2 is NVRTC 11.8).
        Nvrtc => ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"],
        Cublas => ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"],
        CublasLt => ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"],
        _ => throw new ArgumentException($"unknown native library '{library}'", nameof(library)),
    };

    /// <summary>Installs the resolver for this assembly's bindings (once; the binding classes call it).</summary>
    public static void RegisterResolver()
    {
        if (Interlocked.Exchange(ref s_resolverRegistered, 1) == 0)
        {
            NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
        }
    }

    /// <summary>Loads a library (once per process) and says what was found.</summary>
    public static NativeLibraryProbe Load(string library)
    {
        if (library == NvrtcBuiltins)
        {
            throw new ArgumentException("the NVRTC builtins are loaded with NVRTC (see NvrtcBuiltinsProbe)", nameof(library));
        }
        return s_probes.GetOrAdd(library, name => new Lazy<NativeLibraryProbe>(() => LoadUncached(name, Environment.GetEnvironmentVariable))).Value;
    }

    /// <summary>True when <see cref="Load"/> finds the library.</summary>
    public static bool TryLoad(string library, out NativeLibraryProbe probe)
    {
        probe = Load(library);
        return probe.Found;
    }

    /// <summary>The NVRTC builtins preload that loading NVRTC did (null before NVRTC was loaded).</summary>
    public static NativeLibraryProbe? NvrtcBuiltinsProbe =>
        s_probes.TryGetValue(NvrtcBuiltins, out var probe) && probe.IsValueCreated ? probe.Value : null;

    /// <summary>Every library probed so far (in no particular order).</summary>
    public static IReadOnlyList<NativeLibraryProbe> Probed =>
        s_probes.Values.Where(probe => probe.IsValueCreated).Select(probe => probe.Value).ToArray();

    /// <summary>Probes without caching and with the given environment (for tests); loaded libraries stay loaded.
    /// Does not preload NVRTC builtins or cuBLASLt.</summary>
    public static NativeLibraryProbe Probe(string library, Func<string, string?> environment)
    {
        string? variable = EnvironmentVariableFor(library);
        string? overridePath = variable is null ? null : environment(variable);
        if (string.IsNullOrEmpty(overridePath))
        {
            return TryNames(library, variable, null, CandidateNames(library));
        }
        return TryNames(library, variable, overridePath, [overridePath]);
    }

    private static NativeLibraryProbe LoadUncached(string library, Func<string, string?> environment)
    {
        if (library == Cublas)
        {
            // libcublas needs libcublasLt of the same version; loading it first makes an overridden pair load together.
            Load(CublasLt);
        }
        var probe = Probe(library, environment);
        if (library == Nvrtc && probe.Found)
        {
            s_probes.TryAdd(NvrtcBuiltins, new Lazy<NativeLibraryProbe>(() => PreloadNvrtcBuiltins(probe)));
            _ = s_probes[NvrtcBuiltins].Value;
        }
        return probe;
    }

    private static NativeLibraryProbe TryNames(string library, string? variable, string? overridePath, IEnumerable<string> names)
    {
        var attempts = new List<string>();
        foreach (string name in names)
        {
            try
            {
                nint handle = NativeLibrary.Load(name);
                string? path = LoadedPath(handle);
                return new NativeLibraryProbe(library, variable, overridePath, attempts)
                {
                    Handle = handle,
                    LoadedName = name,
                    Path = path,
                    ResolvedPath = path is null ? null : FollowLinks(path),
                };
            }
            catch (DllNotFoundException error)
            {
                attempts.Add($"{name}: {LoaderReason(name, error)}");
            }
        }
        return new NativeLibraryProbe(library, variable, overridePath, attempts);
    }

    // NVRTC opens libnvrtc-builtins.so.<major>.<minor> by name when it compiles; when NVRTC itself was found
    // outside the loader's search path, the builtins next to it are only found if they are already loaded.
    private static unsafe NativeLibraryProbe PreloadNvrtcBuiltins(NativeLibraryProbe nvrtc)
    {
        int major = 0, minor = 0;
        if (NativeLibrary.TryGetExport(nvrtc.Handle, "nvrtcVersion", out nint export))
        {
            ((delegate* unmanaged<int*, int*, int>)export)(&major, &minor);
        }
        var names = new List<string> { $"libnvrtc-builtins.so.{major}.{minor}", $"libnvrtc-builtins.so.{major}", "libnvrtc-builtins.so" };
        string? directory = nvrtc.Path is null ? null : System.IO.Path.GetDirectoryName(nvrtc.Path);
        if (directory is not null)
        {
            names.InsertRange(0, names.Select(name => System.IO.Path.Combine(directory, name)).Where(File.Exists).ToArray());
        }
        return TryNames(NvrtcBuiltins, null, null, names);
    }

    private static nint Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath) => libraryName switch
    {
        Cuda or Nvrtc or Cublas or CublasLt => Load(libraryName).Handle,
        _ => 0,
    };

    private static string LoaderReason(string name, DllNotFoundException error)
    {
        // .NET's message ends with the dynamic loader's own line ("libcuda.so.1: cannot open shared object file: ...").
        string[] lines = error.Message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        string reason = lines.Length == 0 ? error.GetType().Name : lines[^1];
        return reason.StartsWith(name + ": ", StringComparison.Ordinal) ? reason[(name.Length + 2)..] : reason;
    }

    private static string FollowLinks(string path)
    {
        try
        {
            return new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? path;
        }
        catch (IOException)
        {
            return path;
        }
    }

    // dlinfo(RTLD_DI_LINKMAP) gives the loader's link_map for a handle: { ElfW(Addr) l_addr; char* l_name; ... }.
    private static unsafe string? LoadedPath(nint handle)
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        try
        {
            if (dlinfo(handle, RTLD_DI_LINKMAP, out nint linkMap) != 0 || linkMap == 0)
            {
                return null;
            }
            string? name = Marshal.PtrToStringUTF8(((nint*)linkMap)[1]);
            return string.IsNullOrEmpty(name) ? null : name;
        }
        catch (Exception error) when (error is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }

    private const int RTLD_DI_LINKMAP = 2;

    // libdl.so.2 exports dlinfo on every glibc (since 2.34 it forwards to libc.so.6).
    [LibraryImport("libdl.so.2")]
    private static partial int dlinfo(nint handle, int request, out nint info);
}
