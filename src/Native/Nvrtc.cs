using System.Runtime.InteropServices;

namespace KernelLM.Native;

// NVRTC (libnvrtc.so), as nvrtc.h declares it. nvrtcProgram is a pointer (nint). Strings handed to NVRTC are
// UTF-8; strings NVRTC returns (nvrtcGetErrorString) are static and returned as pointers, never freed.

/// <summary>nvrtc.h's nvrtcResult (values 12 and up exist in NVRTC 12 and later only).</summary>
public enum nvrtcResult
{
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_BUILTIN_OPERATION_FAILURE = 7,
    NVRTC_ERROR_NO_NAME_EXPRESSIONS_AFTER_COMPILATION = 8,
    NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION = 9,
    NVRTC_ERROR_NAME_EXPRESSION_NOT_VALID = 10,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
    NVRTC_ERROR_TIME_FILE_WRITE_FAILED = 12,
    NVRTC_ERROR_NO_PCH_CREATE_ATTEMPTED = 13,
    NVRTC_ERROR_PCH_CREATE_HEAP_EXHAUSTED = 14,
    NVRTC_ERROR_PCH_CREATE = 15,
    NVRTC_ERROR_CANCELLED = 16,
    NVRTC_ERROR_TIME_TRACE_FILE_WRITE_FAILED = 17,
}

/// <summary>libnvrtc's exports.</summary>
internal static unsafe partial class Nvrtc
{
    private const string Library = NativeLibraries.Nvrtc;

    static Nvrtc() => NativeLibraries.RegisterResolver();

    /// <summary>Returns a static NUL-terminated string owned by NVRTC.</summary>
    [LibraryImport(Library)] public static partial nint nvrtcGetErrorString(nvrtcResult result);
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcVersion(out int major, out int minor);
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetNumSupportedArchs(out int numArchs);
    /// <summary>supportedArchs: room for nvrtcGetNumSupportedArchs ints (35, 37, ..., 90).</summary>
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetSupportedArchs(int* supportedArchs);

    /// <summary>headers[i] is the text of the header included as includeNames[i].</summary>
    [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nvrtcResult nvrtcCreateProgram(out nint prog, string src, string name, int numHeaders, string[]? headers, string[]? includeNames);

    [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nvrtcResult nvrtcCompileProgram(nint prog, int numOptions, string[] options);

    [LibraryImport(Library)] public static partial nvrtcResult nvrtcDestroyProgram(ref nint prog);
    /// <summary>logSizeRet includes the terminating NUL.</summary>
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetProgramLogSize(nint prog, out nuint logSizeRet);
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetProgramLog(nint prog, byte* log);
    /// <summary>ptxSizeRet includes the terminating NUL.</summary>
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetPTXSize(nint prog, out nuint ptxSizeRet);
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetPTX(nint prog, byte* ptx);
    /// <summary>Zero unless the program was compiled for a real architecture (-arch=sm_XY).</summary>
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetCUBINSize(nint prog, out nuint cubinSizeRet);
    [LibraryImport(Library)] public static partial nvrtcResult nvrtcGetCUBIN(nint prog, byte* cubin);
}
