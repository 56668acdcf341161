using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.RegularExpressions;
using KernelLM.Native;
using static KernelLM.Native.Nvrtc;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

/// <summary>What NVRTC produced: a CUBIN for `sm_XY`, NUL-terminated PTX text for `compute_XY`.</summary>
public enum KernelImageKind : byte
{
    Cubin = 1,
    Ptx = 2,
}

/// <summary>One kernel file compiled for one architecture. <see cref="Log"/> is NVRTC's program log (with
/// `verbose`, the ptxas register / spill report).</summary>
public sealed record CompiledKernel(string FileName, string Arch, KernelImageKind Kind, byte[] Image, string Log)
{
    public IReadOnlyList<string> Options { get; init; } = [];
    public TimeSpan CompileTime { get; init; }
    public bool FromCache { get; init; }
    public string CacheKey { get; init; } = "";

    public PtxasReport Report => PtxasReport.Parse(Log);
}

/// <summary>The NVRTC library in use: version, the architectures it compiles for, and where it is.</summary>
public sealed record NvrtcInfo(int Major, int Minor, IReadOnlyList<int> SupportedArchs, NativeLibraryProbe Library, NativeLibraryProbe? Builtins)
{
    public string Version => string.Create(CultureInfo.InvariantCulture, $"{Major}.{Minor}");

    /// <summary>Version and the library's real file name (`11.8 libnvrtc.so.11.8.89`): part of every cache key.</summary>
    public string Identity => $"{Version} {Path.GetFileName(Library.ResolvedPath ?? Library.Path ?? Library.LoadedName)}";
}

/// <summary>
/// Compiles kernel files with NVRTC; needs no GPU (CI compiles every kernel for sm_80 and sm_90 with it).
/// Options: `-arch=sm_XY` (a CUBIN) or `-arch=compute_XY` (PTX the driver JIT-compiles), `-std=c++17`,
/// `-default-device` (undecorated helpers are device functions), `-lineinfo` (source lines for profilers and
/// compute-sanitizer; no effect on the code) from NVRTC 12 on, and `--ptxas-options=-v` when verbose.
/// NVRTC 11.8 (CI's) crashes the process (SIGSEGV inside nvrtcCompileProgram) on `-lineinfo` with
/// `-arch=sm_90` for some of our kernels (add.cu, argmax.cu, convert.cu, silu_mul.cu), so it is not passed there. Fast math stays off
/// (NVRTC's default; NVRTC has no `--use_fast_math=false` spelling): softmax, norms and entropies are checked
/// against fp64 references. Headers (`common.cuh`) are passed in memory by name; no include path is searched.
/// </summary>
public static partial class NvrtcCompiler
{
    public static IReadOnlyList<string> BaseOptions { get; } = ["-std=c++17", "-default-device"];

    /// <summary>How to get NVRTC on a machine without it (part of the error when it is missing).</summary>
    public const string InstallHint =
        "install it: on Debian 12 run `bash .ci/run` once as root (it adds Debian's non-free component and installs libnvrtc11.2 and " +
        "libnvrtc-builtins11.8), or install a CUDA toolkit, or set KERNELLM_LIBNVRTC to the full path of a libnvrtc.so";

    private static readonly Lazy<NvrtcInfo> s_info = new(LoadInfo);

    /// <summary>The NVRTC in use; throws <see cref="CudaException"/> (with <see cref="InstallHint"/>) when there is none.</summary>
    public static NvrtcInfo Info => s_info.Value;

    public static bool IsAvailable => NativeLibraries.Load(NativeLibraries.Nvrtc).Found;

    /// <summary>The target for a device: `sm_XY` when this NVRTC compiles for it, else PTX for the newest
    /// architecture it supports below (the driver JIT-compiles it forward).</summary>
    public static string TargetFor(int computeCapability)
    {
        var archs = Info.SupportedArchs;
        if (archs.Contains(computeCapability))
        {
            return string.Create(CultureInfo.InvariantCulture, $"sm_{computeCapability}");
        }
        int[] older = archs.Where(arch => arch < computeCapability).ToArray();
        if (older.Length == 0)
        {
            throw new CudaException($"NVRTC {Info.Version} cannot compile for compute capability {computeCapability / 10}.{computeCapability % 10} " +
                $"(it supports {string.Join(", ", archs)})");
        }
        return string.Create(CultureInfo.InvariantCulture, $"compute_{older.Max()}");
    }

    /// <summary>Every option passed to NVRTC for this target.</summary>
    public static IReadOnlyList<string> OptionsFor(string arch, bool verbose, IReadOnlyList<string>? extraOptions = null)
    {
        var kind = KindOf(arch);
        var options = new List<string> { $"-arch={arch}" };
        options.AddRange(BaseOptions);
        if (Info.Major >= 12)
        {
            options.Add("-lineinfo");
        }
        if (verbose && kind == KernelImageKind.Cubin)
        {
            options.Add("--ptxas-options=-v");   // ptxas runs only for real architectures; with PTX there is nothing to report
        }
        options.AddRange(extraOptions ?? []);
        return options;
    }

    /// <summary>Compiles one kernel file for `sm_XY` (CUBIN) or `compute_XY` (PTX). Compile errors throw a
    /// <see cref="CudaException"/> carrying NVRTC's log and the file name.</summary>
    public static CompiledKernel Compile(KernelSource source, string arch, bool verbose = false, IReadOnlyList<string>? extraOptions = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        var kind = KindOf(arch);
        var options = OptionsFor(arch, verbose, extraOptions);
        _ = Info;   // NVRTC present (or a CudaException with the install hint)
        string[] headerNames = source.Headers.Keys.Order(StringComparer.Ordinal).ToArray();
        string[] headerTexts = headerNames.Select(name => source.Headers[name]).ToArray();
        var clock = Stopwatch.StartNew();
        ThrowIfFailed(nvrtcCreateProgram(out nint program, source.Text, source.FileName, headerNames.Length, headerTexts, headerNames));
        try
        {
            var result = nvrtcCompileProgram(program, options.Count, options.ToArray());
            string log = ReadLog(program);
            if (result != nvrtcResult.NVRTC_SUCCESS)
            {
                string name = result.ToString();
                throw new CudaException(
                    $"{source.FileName}: NVRTC {Info.Version} could not compile it for {arch} ({name}; options: {string.Join(' ', options)}):\n{log}",
                    name, log, source.FileName);
            }
            byte[] image = kind == KernelImageKind.Cubin ? ReadCubin(program) : ReadPtx(program);
            return new CompiledKernel(source.FileName, arch, kind, image, log) { Options = options, CompileTime = clock.Elapsed };
        }
        finally
        {
            nvrtcDestroyProgram(ref program);
        }
    }

    /// <summary>As <see cref="Compile(KernelSource, string, bool, IReadOnlyList{string}?)"/>, through a disk cache.</summary>
    public static CompiledKernel Compile(KernelSource source, string arch, KernelCache cache, bool verbose = false, IReadOnlyList<string>? extraOptions = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(cache);
        var options = OptionsFor(arch, verbose, extraOptions);
        string key = CacheKey(source, options, Info.Identity, arch);
        var clock = Stopwatch.StartNew();
        if (cache.TryRead(key, out byte[] payload) && TryDecode(payload, source.FileName, out var cached))
        {
            return cached with { Options = options, CompileTime = clock.Elapsed, FromCache = true, CacheKey = key };
        }
        var compiled = Compile(source, arch, verbose, extraOptions) with { CacheKey = key };
        cache.Write(key, Encode(compiled));
        return compiled;
    }

    /// <summary>The cache key: the source file's name and text, every header's name and text, every option,
    /// the NVRTC identity (version and library file) and the target architecture.</summary>
    public static string CacheKey(KernelSource source, IReadOnlyList<string> options, string nvrtcIdentity, string arch)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(options);
        var parts = new List<string> { "kernellm-nvrtc-v1", "file", source.FileName, source.Text, "headers", source.Headers.Count.ToString(CultureInfo.InvariantCulture) };
        foreach (var header in source.Headers.OrderBy(pair => pair.Key, StringComparer.Ordinal))
        {
            parts.Add(header.Key);
            parts.Add(header.Value);
        }
        parts.Add("options");
        parts.Add(options.Count.ToString(CultureInfo.InvariantCulture));
        parts.AddRange(options);
        parts.Add("nvrtc");
        parts.Add(nvrtcIdentity);
        parts.Add("arch");
        parts.Add(arch);
        return KernelCache.Key(parts);
    }

    public static KernelImageKind KindOf(string arch)
    {
        ArgumentNullException.ThrowIfNull(arch);
        var match = Target().Match(arch);
        if (!match.Success)
        {
            throw new ArgumentException($"architecture '{arch}' is neither sm_XY nor compute_XY", nameof(arch));
        }
        return match.Groups["kind"].Value == "sm" ? KernelImageKind.Cubin : KernelImageKind.Ptx;
    }

    [GeneratedRegex(@"^(?<kind>sm|compute)_\d+[af]?$")]
    private static partial Regex Target();

    private static unsafe NvrtcInfo LoadInfo()
    {
        var library = NativeLibraries.Load(NativeLibraries.Nvrtc);
        if (!library.Found)
        {
            throw new CudaException($"NVRTC (libnvrtc) was not found ({library.Describe()}); {InstallHint}", "libnvrtc not found");
        }
        ThrowIfFailed(nvrtcVersion(out int major, out int minor));
        ThrowIfFailed(nvrtcGetNumSupportedArchs(out int count));
        int[] archs = new int[count];
        fixed (int* pointer = archs)
        {
            ThrowIfFailed(nvrtcGetSupportedArchs(pointer));
        }
        return new NvrtcInfo(major, minor, archs, library, NativeLibraries.NvrtcBuiltinsProbe);
    }

    private static unsafe string ReadLog(nint program)
    {
        ThrowIfFailed(nvrtcGetProgramLogSize(program, out nuint size));
        byte[] log = new byte[(int)size];
        fixed (byte* pointer = log)
        {
            ThrowIfFailed(nvrtcGetProgramLog(program, pointer));
        }
        return Encoding.UTF8.GetString(log.AsSpan().TrimEnd((byte)0));
    }

    private static unsafe byte[] ReadCubin(nint program)
    {
        ThrowIfFailed(nvrtcGetCUBINSize(program, out nuint size));
        byte[] cubin = new byte[(int)size];
        fixed (byte* pointer = cubin)
        {
            ThrowIfFailed(nvrtcGetCUBIN(program, pointer));
        }
        return cubin;
    }

    private static unsafe byte[] ReadPtx(nint program)
    {
        ThrowIfFailed(nvrtcGetPTXSize(program, out nuint size));   // includes the terminating NUL cuModuleLoadData needs
        byte[] ptx = new byte[(int)size];
        fixed (byte* pointer = ptx)
        {
            ThrowIfFailed(nvrtcGetPTX(program, pointer));
        }
        return ptx;
    }

    // Cache payload: kind (byte), arch, log (length-prefixed UTF-8 strings), image length (int32), image.
    private static byte[] Encode(CompiledKernel kernel)
    {
        using var stream = new MemoryStream();
        using (var writer = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true))
        {
            writer.Write((byte)kernel.Kind);
            writer.Write(kernel.Arch);
            writer.Write(kernel.Log);
            writer.Write(kernel.Image.Length);
            writer.Write(kernel.Image);
        }
        return stream.ToArray();
    }

    private static bool TryDecode(byte[] payload, string fileName, out CompiledKernel kernel)
    {
        kernel = null!;
        try
        {
            using var reader = new BinaryReader(new MemoryStream(payload), Encoding.UTF8);
            var kind = (KernelImageKind)reader.ReadByte();
            string arch = reader.ReadString();
            string log = reader.ReadString();
            byte[] image = reader.ReadBytes(reader.ReadInt32());
            if (!Enum.IsDefined(kind) || image.Length == 0 || reader.BaseStream.Position != payload.Length)
            {
                return false;
            }
            kernel = new CompiledKernel(fileName, arch, kind, image, log);
            return true;
        }
        catch (Exception error) when (error is EndOfStreamException or IOException or FormatException or ArgumentException)
        {
            return false;   // a payload from a future format: recompile
        }
    }
}
