using System.Globalization;
using System.Text.RegularExpressions;

namespace KernelLM.Runtime.Cuda.Driver;

/// <summary>One function's resource use as ptxas reports it (`--ptxas-options=-v`).</summary>
public sealed record PtxasFunction(string Name, bool IsEntry)
{
    public string? Arch { get; init; }
    public int? Registers { get; init; }
    public long StackFrameBytes { get; init; }
    public long SpillStoreBytes { get; init; }
    public long SpillLoadBytes { get; init; }
    public long SharedMemoryBytes { get; init; }

    public bool Spills => SpillStoreBytes != 0 || SpillLoadBytes != 0;

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"{Name}{(IsEntry ? "" : " (device function)")}{(Arch is null ? "" : " " + Arch)}: {(Registers is { } registers ? $"{registers} registers, " : "")}" +
        $"{StackFrameBytes} B stack, {SpillStoreBytes} B spill stores, {SpillLoadBytes} B spill loads, {SharedMemoryBytes} B static smem");
}

/// <summary>
/// The register / spill report that ptxas writes into the NVRTC program log when compiling for a real
/// architecture with `--ptxas-options=-v`:
/// <code>
/// ptxas info    : Compiling entry function 'rms_norm_bf16' for 'sm_90'
/// ptxas info    : Function properties for rms_norm_bf16
/// ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 14 registers, 128 bytes smem, 368 bytes cmem[0]
/// </code>
/// </summary>
public sealed partial record PtxasReport(IReadOnlyList<PtxasFunction> Functions)
{
    public bool HasSpills => Functions.Any(function => function.Spills);

    public IEnumerable<PtxasFunction> Spilling => Functions.Where(function => function.Spills);

    public static PtxasReport Parse(string log)
    {
        ArgumentNullException.ThrowIfNull(log);
        var functions = new List<PtxasFunction>();
        var index = new Dictionary<string, int>(StringComparer.Ordinal);
        string? current = null;       // the function the next properties / "Used" lines belong to
        string? arch = null;

        PtxasFunction Get(string name, bool isEntry)
        {
            if (!index.TryGetValue(name, out int at))
            {
                at = functions.Count;
                index[name] = at;
                functions.Add(new PtxasFunction(name, isEntry) { Arch = arch });
            }
            return functions[at];
        }

        void Set(string name, PtxasFunction function) => functions[index[name]] = function;

        foreach (string line in log.Split('\n'))
        {
            if (EntryLine().Match(line) is { Success: true } entry)
            {
                arch = entry.Groups["arch"].Value;
                current = entry.Groups["name"].Value;
                Set(current, Get(current, isEntry: true) with { IsEntry = true, Arch = arch });
            }
            else if (PropertiesLine().Match(line) is { Success: true } properties)
            {
                current = properties.Groups["name"].Value;
                Get(current, isEntry: false);
            }
            else if (current is not null && SpillLine().Match(line) is { Success: true } spill)
            {
                Set(current, Get(current, false) with
                {
                    StackFrameBytes = Number(spill, "stack"),
                    SpillStoreBytes = Number(spill, "stores"),
                    SpillLoadBytes = Number(spill, "loads"),
                });
            }
            else if (current is not null && UsedLine().Match(line) is { Success: true } used)
            {
                var shared = SharedLine().Match(line);
                Set(current, Get(current, false) with
                {
                    Registers = (int)Number(used, "registers"),
                    SharedMemoryBytes = shared.Success ? Number(shared, "smem") : 0,
                });
            }
        }
        return new PtxasReport(functions);
    }

    public override string ToString() => string.Join('\n', Functions);

    private static long Number(Match match, string group) => long.Parse(match.Groups[group].Value, CultureInfo.InvariantCulture);

    [GeneratedRegex(@"Compiling entry function '(?<name>[^']+)' for '(?<arch>[^']+)'")]
    private static partial Regex EntryLine();

    [GeneratedRegex(@"Function properties for (?<name>\S+)")]
    private static partial Regex PropertiesLine();

    [GeneratedRegex(@"(?<stack>\d+) bytes stack frame, (?<stores>\d+) bytes spill stores, (?<loads>\d+) bytes spill loads")]
    private static partial Regex SpillLine();

    [GeneratedRegex(@"Used (?<registers>\d+) registers")]
    private static partial Regex UsedLine();

    [GeneratedRegex(@"(?<smem>\d+) bytes smem")]
    private static partial Regex SharedLine();
}
