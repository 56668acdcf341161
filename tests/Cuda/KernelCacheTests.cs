using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Cuda;

/// <summary>The compiled-kernel disk cache: hits, damaged entries, keys that cover every input, the folder.</summary>
[TestFixture]
public sealed class KernelCacheTests
{
    private string _directory = "";

    [SetUp]
    public void CreateFolder() => _directory = TestPaths.NewTemporaryDirectory("kernel-cache");

    [TearDown]
    public void DeleteFolder()
    {
        if (TestContext.CurrentContext.Result.Outcome.Status != NUnit.Framework.Interfaces.TestStatus.Failed)
        {
            Directory.Delete(_directory, recursive: true);
        }
    }

    [Test]
    public void The_second_compile_is_a_hit_with_the_same_image_and_log()
    {
        CudaTestSupport.RequireNvrtc();
        var cache = new KernelCache(_directory);
        var first = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_90", cache, verbose: true);
        var second = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_90", cache, verbose: true);
        TestContext.Out.WriteLine($"compile {first.CompileTime.TotalMilliseconds:F0} ms, cache hit {second.CompileTime.TotalMilliseconds:F1} ms");
        Assert.That((first.FromCache, second.FromCache), Is.EqualTo((false, true)));
        Assert.That((cache.Misses, cache.Hits, cache.CorruptEntries, cache.WriteFailures), Is.EqualTo((1L, 1L, 0L, 0L)));
        Assert.That(second.Image, Is.EqualTo(first.Image));
        Assert.That(second.Log, Is.EqualTo(first.Log));
        Assert.That((second.Kind, second.Arch, second.FileName, second.CacheKey), Is.EqualTo((first.Kind, first.Arch, first.FileName, first.CacheKey)));
        Assert.That(Directory.GetFiles(_directory).Select(Path.GetFileName), Is.EqualTo(new[] { first.CacheKey + ".kbin" }), "one entry, no temporary files left");
    }

    [TestCase(0.5, TestName = "A flipped byte in an entry is detected and the kernel recompiled")]
    [TestCase(-1.0, TestName = "A truncated entry is detected and the kernel recompiled")]
    public void A_damaged_entry_is_detected_and_recompiled(double where)
    {
        CudaTestSupport.RequireNvrtc();
        var cache = new KernelCache(_directory);
        var original = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", cache);
        string path = cache.PathFor(original.CacheKey);
        byte[] entry = File.ReadAllBytes(path);
        if (where < 0)
        {
            File.WriteAllBytes(path, entry[..(entry.Length / 2)]);
        }
        else
        {
            entry[(int)(entry.Length * where)] ^= 0x20;
            File.WriteAllBytes(path, entry);
        }

        var recompiled = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", cache);
        Assert.That(recompiled.FromCache, Is.False);
        Assert.That(cache.CorruptEntries, Is.EqualTo(1));
        Assert.That(recompiled.Image, Is.EqualTo(original.Image));
        var again = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", cache);
        Assert.That(again.FromCache, Is.True, "the recompiled entry was written back");
        Assert.That(again.Image, Is.EqualTo(original.Image));
    }

    [Test]
    public void Payloads_round_trip_and_garbage_is_not_an_entry()
    {
        var cache = new KernelCache(_directory);
        string key = KernelCache.Key(["payload test"]);
        Assert.That(cache.TryRead(key, out _), Is.False);
        cache.Write(key, [1, 2, 3, 250]);
        Assert.That(cache.TryRead(key, out byte[] payload), Is.True);
        Assert.That(payload, Is.EqualTo(new byte[] { 1, 2, 3, 250 }));
        File.WriteAllText(cache.PathFor(key), "not a cache entry at all, but longer than the header is");
        Assert.That(cache.TryRead(key, out _), Is.False);
        Assert.That(File.Exists(cache.PathFor(key)), Is.False, "a damaged entry is deleted");
        Assert.That((cache.Hits, cache.Misses, cache.CorruptEntries), Is.EqualTo((1L, 2L, 1L)));
    }

    [Test]
    public void An_unwritable_folder_does_not_fail_compilation()
    {
        string file = Path.Combine(_directory, "a-file");
        File.WriteAllText(file, "");
        var cache = new KernelCache(Path.Combine(file, "cache"));   // a folder under a regular file cannot be created
        cache.Write(KernelCache.Key(["x"]), [1]);
        Assert.That(cache.WriteFailures, Is.EqualTo(1));
        Assert.That(cache.LastWriteError, Does.Contain(file));
    }

    [Test]
    public void The_key_covers_source_headers_options_nvrtc_version_and_arch()
    {
        var source = new KernelSource("op.cu", "#include \"common.cuh\"\n", new Dictionary<string, string> { ["common.cuh"] = "// v1", ["extra.cuh"] = "// x" });
        string[] options = ["-arch=sm_90", "-std=c++17"];
        string Key(KernelSource s, IReadOnlyList<string>? o = null, string identity = "11.8 libnvrtc.so.11.8.89", string arch = "sm_90") =>
            NvrtcCompiler.CacheKey(s, o ?? options, identity, arch);

        string baseline = Key(source);
        var variants = new Dictionary<string, string>
        {
            ["source text"] = Key(source with { Text = source.Text + "// changed\n" }),
            ["file name"] = Key(source with { FileName = "other.cu" }),
            ["header text"] = Key(source with { Headers = new Dictionary<string, string> { ["common.cuh"] = "// v2", ["extra.cuh"] = "// x" } }),
            ["header name"] = Key(source with { Headers = new Dictionary<string, string> { ["common2.cuh"] = "// v1", ["extra.cuh"] = "// x" } }),
            ["header added"] = Key(source with { Headers = new Dictionary<string, string> { ["common.cuh"] = "// v1", ["extra.cuh"] = "// x", ["new.cuh"] = "" } }),
            ["option added"] = Key(source, [.. options, "--ptxas-options=-v"]),
            ["option changed"] = Key(source, ["-arch=sm_90", "-std=c++14"]),
            ["options split differently"] = Key(source, ["-arch=sm_90-std=c++17"]),
            ["nvrtc version"] = Key(source, identity: "12.4 libnvrtc.so.12.4.127"),
            ["arch"] = Key(source, arch: "sm_80"),
        };
        foreach (var (change, key) in variants)
        {
            Assert.That(key, Is.Not.EqualTo(baseline), change);
        }
        Assert.That(variants.Values.Distinct().Count(), Is.EqualTo(variants.Count), "every change gives its own key");

        var reordered = source with { Headers = new Dictionary<string, string> { ["extra.cuh"] = "// x", ["common.cuh"] = "// v1" } };
        Assert.That(Key(reordered), Is.EqualTo(baseline), "header order does not matter");
        Assert.That(baseline, Does.Match("^[0-9a-f]{64}$"));
    }

    [Test]
    public void Verbose_and_quiet_compiles_are_cached_separately()
    {
        CudaTestSupport.RequireNvrtc();
        var cache = new KernelCache(_directory);
        var quiet = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", cache);
        var verbose = NvrtcCompiler.Compile(CudaTestSupport.TestKernels, "sm_80", cache, verbose: true);
        Assert.That(verbose.CacheKey, Is.Not.EqualTo(quiet.CacheKey));
        Assert.That(verbose.FromCache, Is.False, "the verbose log (ptxas report) is not in the quiet entry");
        Assert.That(verbose.Report.Functions, Is.Not.Empty);
    }

    [TestCase("/explicit", null, "/home/user", "/explicit")]
    [TestCase(null, "/xdg", "/home/user", "/xdg/kernellm")]
    [TestCase("", "/xdg", "/home/user", "/xdg/kernellm")]
    [TestCase(null, "relative/xdg", "/home/user", "/home/user/.cache/kernellm")]
    [TestCase(null, null, "/home/user", "/home/user/.cache/kernellm")]
    public void The_default_folder_follows_kernellm_cache_dir_then_xdg_then_home(string? explicitDirectory, string? xdg, string home, string expected)
    {
        var environment = new Dictionary<string, string?> { ["KERNELLM_CACHE_DIR"] = explicitDirectory, ["XDG_CACHE_HOME"] = xdg, ["HOME"] = home };
        Assert.That(KernelCache.RootFrom(name => environment.GetValueOrDefault(name)), Is.EqualTo(expected));
    }
}
